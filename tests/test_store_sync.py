"""The service's store: a commit and the fsync that makes it durable are separate steps; reads and updates in bulk.

The broker commits a turn's work without an fsync, forwards its tasks, and
hands its replies to ``GroupCommit``, which releases them once a sync that
began after the commit has returned (docs/reliability.md). These tests check
the store's and the group commit's side of that contract on a real SQLite file.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mep.errors import ServiceUnavailableError
from mep.protocol.messages import SUCCESS, LostTask, Result
from mep.service.group_commit import GroupCommit
from mep.service.store import SQL_CHUNK, Store


@pytest.fixture
def store() -> Iterator[Store]:
    directory = Path(tempfile.mkdtemp(prefix="mep-test-store-", dir="/var/tmp"))
    store = Store(directory / "mep.db")
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(directory)


def _add_tasks(store: Store, count: int, endpoint_id: str = "") -> dict[str, bytes]:
    endpoint_id = endpoint_id or store.add_endpoint(f"endpoint-{uuid.uuid4()}", f"key-{uuid.uuid4()}")
    args = {str(uuid.uuid4()): os.urandom(16) for _ in range(count)}
    with store.transaction(sync=False):
        for task_id, payload in args.items():
            assert store.add_task(task_id, endpoint_id, "submitter", "f" * 64, payload, "{}", "{}", 0.0)
    return args


def test_a_commit_without_sync_is_visible_and_unsynced_until_sync(store: Store) -> None:
    store.add_endpoint("first", "key-first")  # an ordinary transaction syncs by itself
    assert not store.unsynced
    args = _add_tasks(store, 3)
    assert store.unsynced  # committed, not yet known to be on disk: nothing of it may be acknowledged yet
    other = sqlite3.connect(store.path)  # committed means every connection sees it
    try:
        assert other.execute("SELECT count(*) FROM tasks").fetchone()[0] == len(args)
    finally:
        other.close()
    store.sync()
    assert not store.unsynced
    wal = store.path.with_name(store.path.name + "-wal")
    assert store._wal is not None and os.fstat(store._wal).st_ino == os.stat(wal).st_ino  # syncs the live WAL


def test_arguments_are_read_in_bulk_past_one_sql_chunk(store: Store) -> None:
    args = _add_tasks(store, 2 * SQL_CHUNK + 7)
    wanted = list(args)[::-1]
    assert store.task_args(wanted) == args
    assert store.task_args([]) == {}


def _released_when_woken(commit: GroupCommit) -> list:
    select.select([commit.wake_fd], [], [], 30)  # a sync returned (or the test fails on what is released)
    return commit.released()


def test_group_commit_releases_in_order_only_after_a_sync_that_began_after_the_commit(store: Store) -> None:
    commit: GroupCommit[str] = GroupCommit(store)
    try:
        _add_tasks(store, 1)
        commit.hold("first")
        released = commit.released()
        assert released in ([], ["first"])  # ["first"] only if its sync has already returned
        _add_tasks(store, 1)
        commit.hold("second")  # a second sync starts at once, beside the first
        while len(released) < 2 and not store.sync_failure:
            released += _released_when_woken(commit)
        assert released == ["first", "second"] and not store.unsynced
        commit.hold("nothing new to sync")
        assert commit.released() == ["nothing new to sync"]
    finally:
        commit.close()


def test_after_a_failed_fsync_nothing_is_released_or_synced_again(store: Store, monkeypatch) -> None:
    def failing_fdatasync(descriptor: int) -> None:  # an I/O error of the disk can't be produced for real here
        raise OSError(errno.EIO, "Input/output error")

    endpoint_id = store.add_endpoint("failing", "key-failing")
    commit: GroupCommit[str] = GroupCommit(store)
    try:
        monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
        _add_tasks(store, 1, endpoint_id)
        commit.hold("acknowledgement")
        assert _released_when_woken(commit) == [] and store.sync_failure is not None
        monkeypatch.undo()  # the disk "works" again: the pages it dropped are not back, so still nothing
        _add_tasks(store, 1, endpoint_id)
        commit.hold("later acknowledgement")
        assert commit.released() == []
        with pytest.raises(ServiceUnavailableError):
            store.sync()
    finally:
        commit.close()


def test_bulk_updates_and_reads_past_one_sql_chunk(store: Store) -> None:
    endpoint_id = store.add_endpoint("bulk", "key-bulk")
    ids = list(_add_tasks(store, SQL_CHUNK + 3, endpoint_id))
    with store.transaction():
        store.mark_dispatched(ids)
        store.mark_started(endpoint_id, ids[1:])
        for task_id in ids[2:]:
            assert store.record_result(endpoint_id, Result(task_id=task_id, status=SUCCESS), task_id.encode())
    ready, pending, unknown = store.results_for("submitter", [*ids, "no-such-task"])
    assert [item.payload for item in ready] == [task_id.encode() for task_id in ids[2:]]
    assert pending == ids[:2] and unknown == ["no-such-task"]
    assert store.task_states() == {"dispatched": 1, "running": 1, "succeeded": SQL_CHUNK + 1}
    with store.transaction():
        store.acknowledge_results("submitter", ids)
    ready, _, _ = store.results_for("submitter", ids[2:])
    assert {item.payload for item in ready} == {None}


def test_a_task_acknowledged_after_its_sync_keeps_its_arguments_through_a_crash(store: Store) -> None:
    """The arguments live in their own table, written in the task's transaction: the sync that precedes the
    acknowledgement covers them too. A child process stores and syncs tasks, reports them acknowledged, and is
    SIGKILLed at once (no close, no checkpoint); the store opened afresh has every one with its arguments."""
    endpoint_id = store.add_endpoint("crash", "key-crash")
    store.close()
    args = {str(uuid.uuid4()): os.urandom(size) for size in (1, 4096, 100 * 1024, 300 * 1024)}
    report_read, report_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child never returns
        os.close(report_read)
        writer = Store(store.path)
        with writer.transaction(sync=False):
            for task_id, payload in args.items():
                writer.add_task(task_id, endpoint_id, "submitter", "f" * 64, payload, "{}", "{}", 0.0)
        writer.sync()
        os.write(report_write, b"acknowledged")
        os.kill(os.getpid(), 9)
    os.close(report_write)
    try:
        assert os.read(report_read, 64) == b"acknowledged"
    finally:
        os.close(report_read)
        os.waitpid(child, 0)
    reopened = Store(store.path)
    try:
        assert reopened.task_args(list(args)) == args
        waiting = reopened.waiting_tasks(endpoint_id, 10)
        assert {task.task_id: task.args_bytes for task in waiting} == {k: len(v) for k, v in args.items()}
    finally:
        reopened.close()


def test_a_task_that_ended_keeps_no_arguments(store: Store) -> None:
    endpoint_id = store.add_endpoint("ended", "key-ended")
    ids = list(_add_tasks(store, 3, endpoint_id))
    with store.transaction():
        store.mark_dispatched(ids)
        assert store.record_result(endpoint_id, Result(task_id=ids[0], status=SUCCESS), b"result")
        store.request_cancel("submitter", ids[1:2])  # dispatched: only marked; its endpoint ends it
        store.tasks_lost(endpoint_id, [LostTask(task_id=ids[2], reason="the endpoint died", attempted=True)], 1)
    assert list(store.task_args(ids)) == [ids[1]]
    assert store.db.execute("SELECT count(*) FROM task_args").fetchone()[0] == 1


# What the tasks table was before arguments had a table of their own (a database an older mep created).
OLD_TASKS_TABLE = """
CREATE TABLE tasks (
    id TEXT PRIMARY KEY, endpoint_id TEXT NOT NULL, submitter_id TEXT NOT NULL, fn_hash TEXT NOT NULL,
    config TEXT NOT NULL, runtime TEXT NOT NULL, walltime REAL NOT NULL DEFAULT 0,
    resources TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, dispatched_at REAL, started_at REAL,
    completed_at REAL, result_status TEXT, result_code TEXT, result_message TEXT, result_error_type TEXT,
    result_traceback TEXT, acked_at REAL, result_large TEXT, result_payload BLOB, args BLOB
);
"""


def test_a_database_an_older_mep_created_keeps_its_waiting_tasks_arguments() -> None:
    directory = Path(tempfile.mkdtemp(prefix="mep-test-store-", dir="/var/tmp"))
    try:
        with sqlite3.connect(directory / "mep.db", isolation_level=None) as db:
            db.executescript(OLD_TASKS_TABLE)
            for task_id, state, args in (("waiting-1", "waiting", b"abc"), ("uploaded", "waiting", b""),
                                         ("done", "succeeded", None)):
                db.execute("INSERT INTO tasks (id, endpoint_id, submitter_id, fn_hash, config, runtime, state,"
                           " created_at, args) VALUES (?, 'e', 's', 'f', '{}', '{}', ?, 1.0, ?)",
                           (task_id, state, args))
        db.close()
        for _ in range(2):  # upgraded once; opening it again changes nothing
            store = Store(directory / "mep.db")
            try:
                assert store.task_args(["waiting-1", "uploaded", "done"]) == {"waiting-1": b"abc", "uploaded": b""}
                assert {task.task_id: task.args_bytes for task in store.waiting_tasks("e", 10)} == {
                    "waiting-1": 3, "uploaded": 0}
                assert store.db.execute("SELECT count(*) FROM tasks WHERE args IS NOT NULL").fetchone()[0] == 0
            finally:
                store.close()
    finally:
        shutil.rmtree(directory)


def test_a_message_that_fails_takes_its_deferred_writes_with_it(store: Store) -> None:
    """Started tasks and dropped arguments are written when the transaction commits; a savepoint that rolls back
    (one message's handling failed) leaves nothing of them, and what the other messages did stands."""
    endpoint_id = store.add_endpoint("deferred", "key-deferred")
    args = _add_tasks(store, 3, endpoint_id)
    ids = list(args)
    with store.transaction():
        store.mark_dispatched(ids)
    with store.transaction():
        with store.savepoint():
            store.mark_started(endpoint_id, ids[:1])
        with pytest.raises(RuntimeError), store.savepoint():
            store.mark_started(endpoint_id, ids[1:])
            assert store.record_result(endpoint_id, Result(task_id=ids[2], status=SUCCESS), b"result")
            raise RuntimeError("this message's handling failed")
    assert store.task_states() == {"running": 1, "dispatched": 2}
    assert store.task_args(ids) == args
