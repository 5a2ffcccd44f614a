"""The service's store: a commit and the fsync that makes it durable are separate steps; arguments are read in bulk.

The broker commits a turn's work without an fsync, forwards its tasks, then
calls ``sync()`` before acknowledging anything (docs/reliability.md). These
tests check the store's side of that contract on a real SQLite file.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def _add_tasks(store: Store, count: int) -> dict[str, bytes]:
    endpoint_id = store.add_endpoint(f"endpoint-{uuid.uuid4()}", f"key-{uuid.uuid4()}")
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
