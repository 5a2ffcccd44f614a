"""Durable state of the service: identities, endpoints, functions, tasks and results, in SQLite.

One file in the service's state directory, in WAL mode: a batch is
acknowledged only after its transaction is fsynced, so an acknowledged task or
result survives a crash of the service process and of the machine. The commit
and the fsync are two steps (``transaction(sync=False)``, then ``sync()``, or
``begin_sync``/``end_sync`` around an fdatasync on another thread: SQLite's
``synchronous=NORMAL`` commit, then an ``fdatasync`` of the WAL, which together
are what ``synchronous=FULL`` does in one), so that the broker can forward a
committed batch's tasks while the fsync runs and acknowledge them after it
(``mep.service.group_commit``). Batching on the hot path pays the fsync once
per batch, not once per task.

The broker loop owns one connection; admin commands (``mep service identity
add`` ...) open their own, which is why revocation takes effect on the next
message a revoked caller sends.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from mep.errors import ConfigurationError, ErrorCode, ServiceUnavailableError
from mep.protocol.messages import (
    CANCELLED,
    EXPIRED,
    SUCCESS,
    TASK_ERROR,
    IdentityResource,
    LargeResult,
    LostTask,
    Result,
    TaskInfo,
    TaskQuery,
)
from mep.protocol.messages import FAILED as WIRE_FAILED
from mep.protocol.user_config import dumps_config, loads_config

SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    email TEXT, name TEXT, organization TEXT, identity_provider TEXT,
    status TEXT NOT NULL DEFAULT 'used',
    set_id TEXT NOT NULL,
    token_hash TEXT UNIQUE,
    revoked_at REAL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    manager_public_key TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS functions (
    hash TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    submitter_id TEXT NOT NULL,
    fn_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    runtime TEXT NOT NULL,
    walltime REAL NOT NULL DEFAULT 0,   -- seconds; 0: none
    resources TEXT NOT NULL DEFAULT '{}',  -- the task's resource_specification, JSON
    state TEXT NOT NULL,                -- see TASK_STATES
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    dispatched_at REAL,
    started_at REAL,
    completed_at REAL,
    result_status TEXT, result_code TEXT, result_message TEXT,
    result_error_type TEXT, result_traceback TEXT,
    acked_at REAL,
    result_large TEXT,  -- JSON of a LargeResult: the payload is in a file on the endpoint's host
    args_bytes INTEGER NOT NULL DEFAULT 0,  -- length of the task's arguments (in task_args); 0: uploaded
    -- The blob comes last: SQLite reads a row's columns in order, following a blob's overflow pages to get past
    -- it, so a column after a megabyte of result costs reading the megabyte.
    result_payload BLOB
);
-- A task's arguments, written in the transaction that adds the task and deleted when it ends. Not in the task's
-- row: every state change rewrites that row whole, and with it a blob in it (100 KiB of arguments made each of
-- dispatched, running and finished a 100 KiB write). A rowid table: WITHOUT ROWID keeps less of a row in its
-- B-tree page and was slower with large arguments.
CREATE TABLE IF NOT EXISTS task_args (
    task_id TEXT PRIMARY KEY,
    args BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_endpoint_state ON tasks(endpoint_id, state, created_at);
-- Partial indexes: each holds only the rows its question is about, so fair dispatch and the quota checks
-- seek instead of scanning however many tasks the table holds.
CREATE INDEX IF NOT EXISTS tasks_waiting_by_submitter ON tasks(endpoint_id, submitter_id, created_at)
    WHERE state='waiting';
CREATE INDEX IF NOT EXISTS tasks_unfinished_by_submitter ON tasks(submitter_id)
    WHERE state IN ('waiting','dispatched','running');
CREATE INDEX IF NOT EXISTS tasks_uncollected_by_submitter ON tasks(submitter_id)
    WHERE result_payload IS NOT NULL;
"""

TOKEN_PREFIX = "mep_"

# A task's life: waiting (accepted, on disk) -> dispatched (with its manager) -> running (a worker has it)
# -> one terminal state. A lost endpoint sends dispatched/running tasks back to waiting.
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "expired")
TASK_STATES = ("waiting", "dispatched", "running", *TERMINAL_STATES)
TERMINAL_SQL = "('succeeded','failed','cancelled','expired')"
FINAL_STATE = {SUCCESS: "succeeded", TASK_ERROR: "failed", WIRE_FAILED: "failed", CANCELLED: "cancelled",
               EXPIRED: "expired"}
SQL_CHUNK = 500  # values bound in one IN (...) list: far below any SQLite build's variable limit

# SQLite's primary result codes that mean "the storage under the database failed", not "the query was wrong".
SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 8, 10, 13, 14
DISK_FULL = ("the service's disk is full, so nothing of this request was stored; send it again later "
             "(what the service acknowledged before is safe)")
STORAGE_FAILED = ("the service can't write its database right now, so nothing of this request was stored; "
                  "send it again later (what the service acknowledged before is safe)")


def _storage_failure(exc: BaseException) -> ServiceUnavailableError | None:
    """The researcher-facing error for a failure of the service's storage; None for any other error."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", -1) & 0xFF  # an extended code's low byte is its primary code
    if code == SQLITE_FULL:
        error = ServiceUnavailableError(DISK_FULL)
    elif code in (SQLITE_IOERR, SQLITE_READONLY, SQLITE_CANTOPEN):
        error = ServiceUnavailableError(STORAGE_FAILED)
    else:
        return None
    error.admin_detail = f"{type(exc).__name__}: {exc}"
    return error


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Re-raise a storage failure as ``ServiceUnavailableError`` (the original chained, for the log)."""
    try:
        yield
    except sqlite3.Error as exc:
        error = _storage_failure(exc)
        if error is None:
            raise
        raise error from exc


def _in_chunks(values: Sequence[str]) -> Iterator[tuple[str, Sequence[str]]]:
    """``values`` in slices of at most ``SQL_CHUNK``, each with its ``?,?,...`` list: one statement per slice."""
    for start in range(0, len(values), SQL_CHUNK):
        chunk = values[start:start + SQL_CHUNK]
        yield ",".join("?" * len(chunk)), chunk


def fdatasync_and_close(descriptor: int) -> OSError | None:
    """The sync ``Store.begin_sync`` hands out (on any thread); its error, for ``Store.end_sync``."""
    try:
        os.fdatasync(descriptor)
    except OSError as exc:
        return exc
    finally:
        os.close(descriptor)
    return None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class NewIdentity:
    identity: IdentityResource
    token: str


@dataclass(frozen=True)
class QueuedTask:
    """A task on its way to a manager, with what the router needs to route it (its arguments: ``task_args``)."""

    task_id: str
    fn_hash: str
    args_bytes: int
    submitter_id: str
    config: str
    runtime: str
    walltime: float
    resources: str  # JSON


@dataclass
class CancelOutcome:
    cancelled: list[str] = field(default_factory=list)  # never reached an endpoint: cancelled now
    forwarded: dict[str, list[str]] = field(default_factory=dict)  # endpoint id -> ids it must stop
    finished: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StoredResult:
    result: Result
    payload: bytes | None


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        # A larger statement cache (default 128): every length of an id list (IN (?,?,...), up to SQL_CHUNK) is a
        # statement of its own, and at load they pushed the hot INSERT and UPDATEs out, to be prepared again.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=1024)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit writes the WAL without an fsync (a full disk still fails the COMMIT); sync() adds the
        # fsync. NORMAL keeps syncing the WAL's header and around checkpoints exactly as FULL does.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        # Up to 32 MiB of pages (default 2 MiB): arguments passing through would otherwise push the task rows and
        # indexes every turn touches out of the cache, to be read back from the WAL.
        self.db.execute("PRAGMA cache_size=-32768")
        self.db.executescript(SCHEMA)
        self._wal: int | None = None  # a descriptor of the WAL, for sync()
        # Transactions that changed something, counted as they commit, and how many of them a sync has made
        # durable: a reply may go out once the count it waits for is durable.
        self.commits = 0
        self.durable_commits = 0
        self.sync_failure: ServiceUnavailableError | None = None  # the fsync that failed, if one did
        # Grows whenever tasks may have become waiting: while it stands still, a look for waiting tasks that
        # found no more finds none again (the broker skips it; an idle turn then reads nothing).
        self.waiting_added = 0
        # Writes put off until the transaction commits, so that a turn's messages share one prepared statement
        # each instead of one statement per message: (started at, task id, endpoint id) of tasks a worker has
        # (mark_started), and ids of tasks that ended, whose arguments go (_drop_arguments).
        self._started: list[tuple[float, str, str]] = []
        self._ended: list[str] = []
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A database an older mep created gains the columns added since, with their defaults (CREATE TABLE IF
        NOT EXISTS won't), so an upgrade keeps its tasks."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(tasks)")}
        if "result_large" not in columns:
            self.db.execute("ALTER TABLE tasks ADD COLUMN result_large TEXT")
        if "resources" not in columns:
            self.db.execute("ALTER TABLE tasks ADD COLUMN resources TEXT NOT NULL DEFAULT '{}'")
        if "args_bytes" not in columns:
            self._move_arguments_out_of_task_rows()

    def _move_arguments_out_of_task_rows(self) -> None:
        """A database from before task_args kept arguments in the task's row (``tasks.args``): move those of
        unfinished tasks to task_args, in one transaction (an interrupted upgrade is done again on the next
        start). The emptied column stays: dropping it would rewrite the whole table."""
        with self.transaction():
            self.db.execute("ALTER TABLE tasks ADD COLUMN args_bytes INTEGER NOT NULL DEFAULT 0")
            self.db.execute("INSERT OR IGNORE INTO task_args (task_id, args) SELECT id, args FROM tasks"
                            " WHERE args IS NOT NULL")
            self.db.execute("UPDATE tasks SET args_bytes=length(args), args=NULL WHERE args IS NOT NULL")

    def close(self) -> None:
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None
        self.db.close()

    @contextmanager
    def transaction(self, *, sync: bool = True) -> Iterator[sqlite3.Connection]:
        """Commits on exit (durably, unless ``sync`` is False: then a sync must follow before anything
        committed is acknowledged), rolls back on error.

        A storage failure (disk full, I/O error) raises ``ServiceUnavailableError``
        and leaves nothing of the transaction behind; SQLite may have rolled it
        back by itself already, which is why the rollback is conditional.
        """
        with _storage_errors():
            self.db.execute("BEGIN IMMEDIATE")
            changes = self.db.total_changes
            try:
                yield self.db
                self._write_deferred()
                self.db.execute("COMMIT")
            except BaseException:
                self._started.clear()
                self._ended.clear()
                self._roll_back("ROLLBACK")
                raise
            if self.db.total_changes != changes:
                self.commits += 1
        if sync:
            self.sync()

    @property
    def unsynced(self) -> bool:
        """Whether a transaction that changed something committed since the last sync that returned."""
        return self.commits != self.durable_commits

    def sync(self) -> None:
        """Make every transaction committed so far durable (survive a machine crash): fdatasync the WAL.

        Raises ``ServiceUnavailableError`` if the disk reports a write error: what was committed may then not
        be on disk, so nothing of it may be acknowledged. That holds for good: after a failed fsync Linux may
        have dropped the unwritten pages and a later fsync succeeds without them, so every later sync fails
        too (``sync_failure``); only a new process, reading what the disk really holds, may promise again.
        """
        if self.sync_failure is None and not self.unsynced:
            return
        covers, descriptor = self.begin_sync()
        self.end_sync(covers, fdatasync_and_close(descriptor))
        if self.sync_failure is not None:
            raise self._sync_failed_error()

    def begin_sync(self) -> tuple[int, int]:
        """A sync for another thread to run: (the commits it covers, a descriptor of the WAL to fdatasync and
        close), then ``end_sync``. Raises ``ServiceUnavailableError`` once a sync has failed."""
        if self.sync_failure is not None:
            raise self._sync_failed_error()
        covers = self.commits
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            if self._wal is None or os.fstat(self._wal).st_ino != os.stat(wal).st_ino:
                # First use, or the WAL was deleted and created again (only when every connection closed): a
                # descriptor of the old file would sync nothing that matters.
                if self._wal is not None:
                    os.close(self._wal)
                    self._wal = None
                self._wal = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
                directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(directory)  # the WAL's directory entry, once per WAL file
                finally:
                    os.close(directory)
            return covers, os.dup(self._wal)  # its own descriptor: the WAL's may be replaced meanwhile
        except OSError as exc:
            self.end_sync(covers, exc)
            raise self._sync_failed_error() from exc

    def end_sync(self, covers: int, error: BaseException | None) -> None:
        """A sync from ``begin_sync`` returned: the commits it covers are durable, or, if it failed, nothing
        this process committed may be promised any more."""
        if error is None:
            self.durable_commits = max(self.durable_commits, covers)
        elif self.sync_failure is None:
            failure = ServiceUnavailableError(STORAGE_FAILED)
            failure.admin_detail = f"fdatasync of {self.path.name}-wal in {self.path.parent}: {error}"
            self.sync_failure = failure

    def _sync_failed_error(self) -> ServiceUnavailableError:
        error = ServiceUnavailableError(STORAGE_FAILED)
        error.admin_detail = self.sync_failure.admin_detail if self.sync_failure else ""
        return error

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside a transaction: on error, undo only what was done in this block (one message's work)."""
        with _storage_errors():
            self.db.execute("SAVEPOINT one_message")
            started, ended = len(self._started), len(self._ended)
            try:
                yield
            except BaseException:
                del self._started[started:], self._ended[ended:]  # the block's deferred writes go with it
                self._roll_back("ROLLBACK TO one_message", "RELEASE one_message")
                raise
            self.db.execute("RELEASE one_message")

    def _write_deferred(self) -> None:
        """Just before a commit: the transaction's deferred writes, one executemany each."""
        if self._started:
            ended = set(self._ended)
            self.db.executemany("UPDATE tasks SET state='running', started_at=? WHERE id=? AND +endpoint_id=?"
                                " AND +state='dispatched'", [row for row in self._started if row[1] not in ended])
            # A task that also ended in this transaction (its start and its result came in one turn) is past
            # running: it keeps its final state, and still gets the time it started (its run time, the metrics').
            self.db.executemany("UPDATE tasks SET started_at=? WHERE id=? AND +endpoint_id=? AND started_at IS NULL",
                                [row for row in self._started if row[1] in ended])
            self._started.clear()
        if self._ended:
            self.db.executemany("DELETE FROM task_args WHERE task_id=?", [(task_id,) for task_id in self._ended])
            self._ended.clear()

    def _roll_back(self, *statements: str) -> None:
        if not self.db.in_transaction:
            return
        try:
            for statement in statements:
                self.db.execute(statement)
        except sqlite3.Error:
            if self.db.in_transaction:  # the error being handled matters more; a failed rollback ends it
                self.db.rollback()

    # --- identities ---------------------------------------------------------

    def add_identity(
        self,
        username: str,
        *,
        email: str | None = None,
        name: str | None = None,
        organization: str | None = None,
        identity_provider: str | None = None,
        link_to: str | None = None,
    ) -> NewIdentity:
        identity_id = str(uuid.uuid4())
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)  # 256 bits
        with self.transaction():
            set_id = identity_id
            if link_to is not None:
                row = self.db.execute("SELECT set_id FROM identities WHERE id=?", (link_to,)).fetchone()
                if row is None:
                    raise ConfigurationError(f"cannot link to identity {link_to}: no such identity")
                set_id = row[0]
            self.db.execute(
                "INSERT INTO identities (id, username, email, name, organization, identity_provider,"
                " status, set_id, token_hash, created_at) VALUES (?,?,?,?,?,?,'used',?,?,?)",
                (identity_id, username, email, name, organization, identity_provider, set_id,
                 hash_token(token), time.time()),
            )
        resource = IdentityResource(id=identity_id, username=username, email=email, name=name,
                                    organization=organization, identity_provider=identity_provider)
        return NewIdentity(identity=resource, token=token)

    def revoke_identity(self, identity_id: str) -> bool:
        with self.transaction():
            cursor = self.db.execute(
                "UPDATE identities SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                (time.time(), identity_id),
            )
        return cursor.rowcount == 1

    def rotate_token(self, identity_id: str) -> str | None:
        """A new token for an active identity (the old one stops working); None if there is no such identity."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.transaction():
            cursor = self.db.execute("UPDATE identities SET token_hash=? WHERE id=? AND revoked_at IS NULL",
                                     (hash_token(token), identity_id))
        return token if cursor.rowcount == 1 else None

    def identity_for_token(self, token: str) -> str | None:
        row = self.db.execute(
            "SELECT id FROM identities WHERE token_hash=? AND revoked_at IS NULL", (hash_token(token),)
        ).fetchone()
        return row[0] if row else None

    def identity_set(self, identity_id: str) -> list[IdentityResource]:
        """The submitter first, then its linked identities, in the Globus Auth shape."""
        rows = self.db.execute(
            "SELECT id, username, status, email, name, organization, identity_provider FROM identities"
            " WHERE set_id=(SELECT set_id FROM identities WHERE id=?) ORDER BY id<>?, created_at",
            (identity_id, identity_id),
        ).fetchall()
        return [
            IdentityResource(id=r[0], username=r[1], status=r[2], email=r[3], name=r[4],
                             organization=r[5], identity_provider=r[6])
            for r in rows
        ]

    def list_identities(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT id, username, set_id, revoked_at IS NOT NULL FROM identities ORDER BY created_at"
        ).fetchall()
        return [{"id": r[0], "username": r[1], "set_id": r[2], "revoked": bool(r[3])} for r in rows]

    # --- endpoints ----------------------------------------------------------

    def add_endpoint(self, name: str, manager_public_key: str) -> str:
        endpoint_id = str(uuid.uuid4())
        try:
            with self.transaction():
                self.db.execute(
                    "INSERT INTO endpoints (id, name, manager_public_key, created_at) VALUES (?,?,?,?)",
                    (endpoint_id, name, manager_public_key, time.time()),
                )
        except sqlite3.IntegrityError:
            raise ConfigurationError(f"an endpoint named {name!r} is already registered") from None
        return endpoint_id

    def endpoint_exists(self, endpoint_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM endpoints WHERE id=?", (endpoint_id,)).fetchone() is not None

    def endpoint_for_manager_key(self, public_key: str) -> str | None:
        row = self.db.execute(
            "SELECT id FROM endpoints WHERE manager_public_key=?", (public_key,)
        ).fetchone()
        return row[0] if row else None

    def list_endpoints(self) -> list[dict[str, str]]:
        rows = self.db.execute("SELECT id, name FROM endpoints ORDER BY created_at").fetchall()
        return [{"id": r[0], "name": r[1]} for r in rows]

    # --- functions and tasks ------------------------------------------------

    def known_functions(self, hashes: Iterable[str]) -> set[str]:
        wanted = list(set(hashes))
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.db.execute(
                f"SELECT hash FROM functions WHERE hash IN ({marks})", chunk))
        return found

    def add_function(self, fn_hash: str, body: bytes) -> None:
        self.db.execute("INSERT OR IGNORE INTO functions (hash, body) VALUES (?,?)", (fn_hash, body))

    def function_body(self, fn_hash: str) -> bytes:
        return self.db.execute("SELECT body FROM functions WHERE hash=?", (fn_hash,)).fetchone()[0]

    def add_task(self, task_id: str, endpoint_id: str, submitter_id: str, fn_hash: str, args: bytes,
                 config: str, runtime: str, walltime: float, resources: str = "{}") -> bool:
        """False when the id is already taken (a resubmission): the first one stands."""
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO tasks (id, endpoint_id, submitter_id, fn_hash, args_bytes, config, runtime,"
            " walltime, resources, state, created_at) VALUES (?,?,?,?,?,?,?,?,?,'waiting',?)",
            (task_id, endpoint_id, submitter_id, fn_hash, len(args), config, runtime, walltime, resources,
             time.time()),
        )
        if cursor.rowcount != 1:
            return False
        self.db.execute("INSERT INTO task_args (task_id, args) VALUES (?,?)", (task_id, args))
        self.waiting_added += 1
        return True

    def task_owner(self, task_id: str) -> str | None:
        row = self.db.execute("SELECT submitter_id FROM tasks WHERE id=?", (task_id,)).fetchone()
        return row[0] if row else None

    def waiting_tasks(self, endpoint_id: str, limit: int, *, after: str = "",
                      exclude: frozenset[str] = frozenset()) -> list[QueuedTask]:
        """Up to ``limit`` waiting tasks of the endpoint, dealt round-robin across their submitters.

        Submitters are taken in id order, starting after ``after`` (the last one
        served) and wrapping around, skipping ``exclude``; each round gives
        every one of them its oldest task not yet taken. So a submitter's first
        task waits for at most one task of each other submitter, however long
        their backlogs. Every query seeks the partial index of waiting tasks.
        """
        submitters = self._waiting_submitters(endpoint_id, after, exclude, limit)
        taken: dict[str, list[QueuedTask]] = {}
        share = max(1, limit // max(1, len(submitters)))
        active = submitters
        while active and sum(map(len, taken.values())) < limit:
            still_waiting = []
            for submitter in active:
                rows = self.db.execute(
                    "SELECT id, fn_hash, args_bytes, submitter_id, config, runtime, walltime, resources FROM tasks"
                    " WHERE endpoint_id=? AND state='waiting' AND submitter_id=? ORDER BY created_at LIMIT ? OFFSET ?",
                    (endpoint_id, submitter, share, len(taken.get(submitter, ())))).fetchall()
                taken.setdefault(submitter, []).extend(QueuedTask(*row) for row in rows)
                if len(rows) == share:
                    still_waiting.append(submitter)
            active = still_waiting
        dealt = [task for round_ in itertools.zip_longest(*(taken[s] for s in submitters)) for task in round_ if task]
        return dealt[:limit]

    def _waiting_submitters(self, endpoint_id: str, after: str, exclude: frozenset[str], limit: int) -> list[str]:
        """Distinct submitters with waiting tasks, in id order from just after ``after``, wrapping; at most ``limit``."""
        found: list[str] = []
        for low, high in ((after, None), ("", after)):
            cursor = low
            while len(found) < limit:
                row = self.db.execute(
                    "SELECT submitter_id FROM tasks WHERE endpoint_id=? AND state='waiting' AND submitter_id>?"
                    " ORDER BY submitter_id LIMIT 1", (endpoint_id, cursor)).fetchone()
                if row is None or (high is not None and row[0] > high):
                    break
                cursor = row[0]
                if cursor not in exclude:
                    found.append(cursor)
            if not after:
                break
        return found

    def task_args(self, task_ids: Sequence[str]) -> dict[str, bytes]:
        """The arguments of these tasks, by id: one query per ``SQL_CHUNK``, not one per task."""
        found: dict[str, bytes] = {}
        for marks, chunk in _in_chunks(task_ids):
            found.update(self.db.execute(f"SELECT task_id, args FROM task_args WHERE task_id IN ({marks})", chunk))
        return found

    def return_to_waiting(self, endpoint_id: str, task_ids: Sequence[str]) -> None:
        """Dispatched tasks the manager handed back unheld: they wait again without using an attempt."""
        for marks, chunk in _in_chunks(task_ids):
            self.waiting_added += self.db.execute(
                f"UPDATE tasks SET state='waiting', dispatched_at=NULL WHERE id IN ({marks}) AND +endpoint_id=?"
                " AND +state='dispatched'", (*chunk, endpoint_id)).rowcount  # +: the primary key (mark_started)

    def unfinished_tasks(self, submitter_id: str) -> int:
        """Tasks of this identity not yet finished (waiting, dispatched or running)."""
        return self.db.execute("SELECT count(*) FROM tasks WHERE submitter_id=?"
                               " AND state IN ('waiting','dispatched','running')", (submitter_id,)).fetchone()[0]

    def uncollected_result_bytes(self, submitter_id: str) -> int:
        """Bytes of this identity's stored results not yet acknowledged (length() reads no blob content)."""
        return self.db.execute("SELECT coalesce(sum(length(result_payload)), 0) FROM tasks WHERE submitter_id=?"
                               " AND result_payload IS NOT NULL", (submitter_id,)).fetchone()[0]

    def mark_dispatched(self, task_ids: Sequence[str]) -> None:
        now = time.time()
        for marks, chunk in _in_chunks(task_ids):
            self.db.execute(f"UPDATE tasks SET state='dispatched', dispatched_at=? WHERE id IN ({marks})"
                            " AND state='waiting'", (now, *chunk))

    def mark_started(self, endpoint_id: str, task_ids: Sequence[str]) -> None:
        """Written when the transaction commits (``_write_deferred``; the unary + there keeps SQLite on the primary
        key, not on the endpoint's every dispatched task by tasks_by_endpoint_state)."""
        now = time.time()
        self._started.extend((now, task_id, endpoint_id) for task_id in task_ids)
        self._write_deferred_outside_a_transaction()

    def _write_deferred_outside_a_transaction(self) -> None:
        if not self.db.in_transaction:  # a caller without a transaction: its statement commits by itself
            self._write_deferred()

    def requeue_in_flight(self, endpoint_id: str) -> tuple[int, list[str]]:
        """A manager (re)registered: what its predecessor had in flight is sent again (at-least-once),
        except what the submitter has asked to cancel meanwhile, which ends cancelled.

        Returns (how many were queued again, ids cancelled now).
        """
        in_flight = "endpoint_id=? AND state IN ('dispatched','running')"
        cancelled = [row[0] for row in self.db.execute(
            f"SELECT id FROM tasks WHERE {in_flight} AND cancel_requested", (endpoint_id,))]
        self._finish(cancelled, CANCELLED, ErrorCode.CANCELLED, "cancelled by the submitter")
        cursor = self.db.execute(
            f"UPDATE tasks SET state='waiting', dispatched_at=NULL, started_at=NULL WHERE {in_flight}",
            (endpoint_id,))
        self.waiting_added += cursor.rowcount
        return cursor.rowcount, cancelled

    def record_result(self, endpoint_id: str, result: Result, payload: bytes | None) -> bool:
        """Record a result once; a duplicate or a result for another endpoint's task is ignored."""
        cursor = self.db.execute(
            f"UPDATE tasks SET state=?, completed_at=?, result_status=?, result_code=?,"
            f" result_message=?, result_error_type=?, result_traceback=?, result_payload=?, result_large=?"
            f" WHERE id=? AND endpoint_id=? AND state NOT IN {TERMINAL_SQL}",
            (FINAL_STATE.get(result.status, "failed"), time.time(), result.status, result.code, result.message,
             result.error_type, result.traceback, payload,
             msgspec.json.encode(result.large).decode() if result.large else None, result.task_id, endpoint_id),
        )
        if cursor.rowcount != 1:
            return False
        self._drop_arguments([result.task_id])
        return True

    def _drop_arguments(self, task_ids: Sequence[str]) -> None:
        """A task ended: nothing will read its arguments again (deleted when the transaction commits)."""
        self._ended.extend(task_ids)
        self._write_deferred_outside_a_transaction()

    def fail_task(self, endpoint_id: str, task_id: str, code: str, message: str) -> bool:
        """A manager refused a task it was sent (never another endpoint's task)."""
        return self.record_result(endpoint_id, Result(task_id=task_id, status=WIRE_FAILED, code=code,
                                                      message=message), None)

    def tasks_lost(self, endpoint_id: str, lost: Sequence[LostTask], max_attempts: int) -> list[str]:
        """Tasks whose user endpoint died: queued again, or failed once they used up their attempts.

        Only a task the endpoint had counts an attempt; one still queued at the
        router goes back without penalty. A task whose cancellation was pending
        ends cancelled. Returns the ids that ended.
        """
        failed = []
        for item in lost:
            row = self.db.execute(
                f"SELECT attempts, cancel_requested FROM tasks WHERE id=? AND endpoint_id=?"
                f" AND state NOT IN {TERMINAL_SQL}", (item.task_id, endpoint_id)).fetchone()
            if row is None:
                continue
            if row[1]:  # its submitter wanted it stopped anyway
                self._finish([item.task_id], CANCELLED, ErrorCode.CANCELLED, "cancelled by the submitter")
                failed.append(item.task_id)
                continue
            attempts = row[0] + (1 if item.attempted else 0)
            if attempts >= max_attempts:
                reason = f"{item.reason} (attempt {attempts} of {max_attempts}; not retried again)"
                self.db.execute(
                    "UPDATE tasks SET attempts=?, state='failed', completed_at=?, result_status=?, result_code=?,"
                    " result_message=? WHERE id=?",
                    (attempts, time.time(), WIRE_FAILED, ErrorCode.ENDPOINT_LOST, reason, item.task_id))
                self._drop_arguments([item.task_id])
                failed.append(item.task_id)
            else:
                self.db.execute(
                    "UPDATE tasks SET attempts=?, state='waiting', dispatched_at=NULL, started_at=NULL WHERE id=?",
                    (attempts, item.task_id))
                self.waiting_added += 1
        return failed

    def request_cancel(self, submitter_id: str, task_ids: Sequence[str]) -> CancelOutcome:
        """Cancel what has not reached an endpoint at once; mark the rest for the endpoint to stop."""
        outcome = CancelOutcome()
        for task_id in task_ids:
            row = self.db.execute("SELECT state, endpoint_id FROM tasks WHERE id=? AND submitter_id=?",
                                  (task_id, submitter_id)).fetchone()
            if row is None:
                outcome.unknown.append(task_id)
            elif row[0] in TERMINAL_STATES:
                outcome.finished.append(task_id)
            elif row[0] == "waiting":
                self._finish([task_id], CANCELLED, ErrorCode.CANCELLED, "cancelled by the submitter")
                outcome.cancelled.append(task_id)
            else:
                self.db.execute("UPDATE tasks SET cancel_requested=1 WHERE id=?", (task_id,))
                outcome.forwarded.setdefault(row[1], []).append(task_id)
        return outcome

    def expire_results(self, retention: float) -> int:
        """Results nobody collected within the retention period are dropped and reported as expired."""
        cursor = self.db.execute(
            "UPDATE tasks SET state='expired', result_payload=NULL, result_large=NULL WHERE acked_at IS NULL"
            " AND state IN ('succeeded','failed','cancelled') AND completed_at < ?",
            (time.time() - retention,))
        return cursor.rowcount

    def _finish(self, task_ids: Sequence[str], status: str, code: str, message: str) -> None:
        now = time.time()
        self.db.executemany(
            "UPDATE tasks SET state=?, completed_at=?, result_status=?, result_code=?, result_message=? WHERE id=?",
            [(FINAL_STATE[status], now, status, code, message, task_id) for task_id in task_ids])
        self._drop_arguments(task_ids)

    def results_for(self, submitter_id: str, task_ids: Sequence[str]) -> tuple[list[StoredResult], list[str], list[str]]:
        """(results ready, ids still pending, ids unknown to this submitter)."""
        rows: dict[str, tuple[Any, ...]] = {}
        for marks, chunk in _in_chunks(task_ids):
            for row in self.db.execute(
                    "SELECT id, state, result_status, result_code, result_message, result_error_type,"
                    f" result_traceback, result_payload, result_large FROM tasks WHERE id IN ({marks})"
                    " AND submitter_id=?", (*chunk, submitter_id)):
                rows[row[0]] = row[1:]
        ready: list[StoredResult] = []
        pending: list[str] = []
        unknown: list[str] = []
        for task_id in task_ids:
            row = rows.get(task_id)
            if row is None:
                unknown.append(task_id)
            elif row[0] == "expired":
                ready.append(StoredResult(Result(task_id=task_id, status=EXPIRED, code=ErrorCode.EXPIRED,
                                                 message="the result was not collected within the service's "
                                                         "retention period and has been deleted"), None))
            elif row[0] not in TERMINAL_STATES:
                pending.append(task_id)
            elif row[1] == SUCCESS and row[6] is None and row[7] is None:
                ready.append(StoredResult(Result(task_id=task_id, status=EXPIRED, code=ErrorCode.EXPIRED,
                                                 message="the result was already collected and has been deleted"),
                                          None))
            else:
                ready.append(_stored_result(task_id, row[1:]))
        return ready, pending, unknown

    def large_result(self, submitter_id: str, task_id: str) -> tuple[str, LargeResult] | None:
        """(endpoint id, reference) of this submitter's uncollected large result of ``task_id``, if it has one."""
        row = self.db.execute("SELECT endpoint_id, result_large FROM tasks WHERE id=? AND submitter_id=?"
                              " AND result_large IS NOT NULL", (task_id, submitter_id)).fetchone()
        return (row[0], msgspec.json.decode(row[1], type=LargeResult)) if row else None

    def acknowledge_results(self, submitter_id: str, task_ids: Sequence[str]) -> None:
        """The client has the results: keep the outcome, drop the bytes."""
        now = time.time()
        for marks, chunk in _in_chunks(task_ids):
            self.db.execute(f"UPDATE tasks SET acked_at=?, result_payload=NULL, result_large=NULL WHERE id IN ({marks})"
                            f" AND submitter_id=? AND state IN {TERMINAL_SQL}", (now, *chunk, submitter_id))

    def task_infos(self, submitter_id: str, query: TaskQuery) -> list[TaskInfo]:
        """The submitter's tasks, newest first, filtered as the query says."""
        limit = max(1, min(query.limit, 10_000))
        if len(query.task_ids) <= SQL_CHUNK:
            return self._task_infos(submitter_id, query, query.task_ids, limit)
        found: list[TaskInfo] = []
        ids = list(dict.fromkeys(query.task_ids))
        for start in range(0, len(ids), SQL_CHUNK):
            found += self._task_infos(submitter_id, query, ids[start:start + SQL_CHUNK], limit)
        found.sort(key=lambda info: info.received_at, reverse=True)
        return found[:limit]

    def _task_infos(self, submitter_id: str, query: TaskQuery, task_ids: Sequence[str], limit: int) -> list[TaskInfo]:
        clauses = ["submitter_id=?"]
        values: list[Any] = [submitter_id]
        if task_ids:
            clauses.append(f"id IN ({','.join('?' * len(task_ids))})")
            values += task_ids
        if query.endpoint_id:
            clauses.append("endpoint_id=?")
            values.append(query.endpoint_id)
        if query.states:
            states = sorted(set(query.states))
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            values += states
        if query.since:
            clauses.append("created_at>=?")
            values.append(query.since)
        rows = self.db.execute(
            "SELECT id, endpoint_id, state, result_code, result_message, attempts, created_at, dispatched_at,"
            " started_at, completed_at, acked_at IS NOT NULL FROM tasks WHERE " + " AND ".join(clauses)
            + " ORDER BY created_at DESC LIMIT ?", (*values, limit)).fetchall()
        return [TaskInfo(task_id=r[0], endpoint_id=r[1], state=r[2], code=r[3] or "", message=r[4] or "",
                         attempts=r[5], received_at=r[6], dispatched_at=r[7] or 0.0, started_at=r[8] or 0.0,
                         completed_at=r[9] or 0.0, collected=bool(r[10])) for r in rows]

    def task_states(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())


def _stored_result(task_id: str, row: Sequence[Any]) -> StoredResult:
    status, code, message, error_type, traceback, payload, large = row
    result = Result(task_id=task_id, status=status, code=code or "", message=message or "",
                    error_type=error_type or "", traceback=traceback or "",
                    large=msgspec.json.decode(large, type=LargeResult) if large else None)
    return StoredResult(result=result, payload=payload)


# The one codec for stored configs, in both directions (see mep.protocol.user_config).
dumps_canonical = dumps_config
loads_canonical = loads_config
