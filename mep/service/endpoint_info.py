"""What the service tells a researcher about an endpoint and about why a task waits.

``EndpointDirectory`` keeps, per endpoint: what its router described at
registration (the admin's options schema and the template's description:
``DESCRIBE``), whether its manager is connected and since when it is not, and
which (submitter, config) groups its router is starting a user endpoint for
(``STARTING``). From these it answers ``ENDPOINT_INFO`` and gives each
unfinished task of a ``TASK_QUERY`` its ``waiting_reason``:

* ``endpoint offline since 2026-12-01 13:10:02 UTC``: no manager is connected;
* ``endpoint starting``: the router is starting the user endpoint for the
  task's submitter and config;
* ``queued behind N tasks``: N unfinished tasks of the same identity on the
  same endpoint were submitted before it (how many of them run is added).

The description and the offline time are stored (they outlive a service
restart and are what a researcher needs most while the manager is away); the
starting groups live in memory, as the manager's connection does.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Collection, Sequence

import msgspec

from mep.errors import ProtocolError, ServiceUnavailableError
from mep.protocol.messages import (
    EndpointInfo,
    EndpointInfoRequest,
    EndpointOptions,
    StartingGroup,
    TaskInfo,
)
from mep.service.store import SQL_CHUNK, Store

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS endpoint_status (
    endpoint_id TEXT PRIMARY KEY,
    options TEXT,            -- EndpointOptions as JSON, from the router's DESCRIBE
    described_at REAL,
    online INTEGER NOT NULL DEFAULT 0,  -- a manager was connected when this was last written
    offline_since REAL       -- when its manager went away (NULL: online, or never connected)
);
"""
UNFINISHED_SQL = "('waiting','dispatched','running')"
WAITING_STATES = ("waiting", "dispatched")


def config_digest(config_text: str) -> str:
    """The name of a canonical config in ``STARTING`` (router and service hash the same canonical JSON)."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


def utc_text(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def checked_options(options: EndpointOptions) -> EndpointOptions:
    """The router's description, its schema proven to be a JSON object (the SDK compiles it)."""
    if options.schema:
        try:
            schema = json.loads(options.schema)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"DESCRIBE: the schema is not JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise ProtocolError("DESCRIBE: the schema must be a JSON object")
    return options


class EndpointDirectory:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.db.executescript(SCHEMA)
        self.starting: dict[str, frozenset[tuple[str, str]]] = {}
        # A row still marked online names a manager connected when the service last stopped: its connection
        # died with the service, so it counts as offline since this start until it registers again. Read so,
        # not rewritten here: a service must start even on a full disk.
        self.started_at = time.time()

    # --- what the broker reports -------------------------------------------------

    def online(self, endpoint_id: str) -> None:
        """A manager registered (inside the broker's transaction)."""
        self.starting.pop(endpoint_id, None)
        self.store.db.execute(
            "INSERT INTO endpoint_status (endpoint_id, online) VALUES (?, 1)"
            " ON CONFLICT(endpoint_id) DO UPDATE SET online=1, offline_since=NULL", (endpoint_id,))

    def offline(self, endpoint_id: str) -> None:
        """Its manager stopped or went silent; written in its own transaction when none is open."""
        self.starting.pop(endpoint_id, None)
        statement = ("INSERT INTO endpoint_status (endpoint_id, online, offline_since) VALUES (?, 0, ?)"
                     " ON CONFLICT(endpoint_id) DO UPDATE SET online=0, offline_since=excluded.offline_since")
        if self.store.db.in_transaction:
            self.store.db.execute(statement, (endpoint_id, time.time()))
            return
        try:
            with self.store.transaction():
                self.store.db.execute(statement, (endpoint_id, time.time()))
        except ServiceUnavailableError as exc:  # only the time shown to researchers is lost
            log.warning("could not record that endpoint %s went offline (%s)", endpoint_id, exc.admin_detail)

    def describe(self, endpoint_id: str, options: EndpointOptions) -> None:
        text = msgspec.json.encode(checked_options(options)).decode()
        self.store.db.execute(
            "INSERT INTO endpoint_status (endpoint_id, options, described_at, online) VALUES (?, ?, ?, 1)"
            " ON CONFLICT(endpoint_id) DO UPDATE SET options=excluded.options, described_at=excluded.described_at",
            (endpoint_id, text, time.time()))

    def set_starting(self, endpoint_id: str, groups: Sequence[StartingGroup]) -> None:
        self.starting[endpoint_id] = frozenset((group.submitter_id, group.config_sha256) for group in groups)

    # --- what researchers ask ------------------------------------------------------

    def info(self, request: EndpointInfoRequest, connected: Collection[str]) -> EndpointInfo:
        row = self.store.db.execute("SELECT options FROM endpoint_status WHERE endpoint_id=?",
                                    (request.endpoint_id,)).fetchone()
        options = msgspec.json.decode(row[0], type=EndpointOptions) if row and row[0] else None
        online = request.endpoint_id in connected
        return EndpointInfo(request_id=request.request_id, endpoint_id=request.endpoint_id, online=online,
                            offline_since=0.0 if online else self._offline_since(request.endpoint_id),
                            ever_online=row is not None, options=options)

    def _offline_since(self, endpoint_id: str) -> float:
        """When the endpoint's manager (not connected now) went away; 0 if it never connected."""
        row = self.store.db.execute("SELECT online, offline_since FROM endpoint_status WHERE endpoint_id=?",
                                    (endpoint_id,)).fetchone()
        if row is None:
            return 0.0
        return self.started_at if row[0] else (row[1] or 0.0)

    def with_reasons(self, submitter_id: str, tasks: list[TaskInfo], connected: Collection[str]) -> list[TaskInfo]:
        """``tasks`` (the submitter's), each waiting one with the reason it waits."""
        waiting = [task for task in tasks if task.state in WAITING_STATES]
        if not waiting:
            return tasks
        placed = self._placement([task.task_id for task in waiting])
        by_endpoint: dict[str, list[TaskInfo]] = defaultdict(list)
        for task in waiting:
            by_endpoint[task.endpoint_id].append(task)
        for endpoint_id, its_tasks in by_endpoint.items():
            if endpoint_id not in connected:
                reason = self._offline_reason(endpoint_id)
                for task in its_tasks:
                    task.waiting_reason = reason
                continue
            starting = self.starting.get(endpoint_id, frozenset())
            ahead = self._queue(submitter_id, endpoint_id)
            for task in its_tasks:
                rowid, config = placed.get(task.task_id, (0, ""))
                if (submitter_id, config_digest(config)) in starting:
                    task.waiting_reason = "endpoint starting"
                    continue
                position = bisect.bisect_left(ahead.rowids, rowid)
                running = ahead.running_before(position)
                if position:
                    task.waiting_reason = (f"queued behind {position} task{'s' if position != 1 else ''}"
                                           + (f" ({running} running)" if running else ""))
        return tasks

    def _offline_reason(self, endpoint_id: str) -> str:
        since = self._offline_since(endpoint_id)
        if not since:
            return "endpoint offline: its manager has not connected to this service yet"
        if since == self.started_at:  # it was connected when the service stopped: when it left is unknown
            return (f"endpoint offline since {utc_text(since)}, when the service started (its manager has not "
                    "connected again)")
        return f"endpoint offline since {utc_text(since)}"

    def _placement(self, task_ids: list[str]) -> dict[str, tuple[int, str]]:
        """task id -> (its place in submission order, its stored config)."""
        found: dict[str, tuple[int, str]] = {}
        for start in range(0, len(task_ids), SQL_CHUNK):
            chunk = task_ids[start:start + SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for task_id, rowid, config in self.store.db.execute(
                    f"SELECT id, rowid, config FROM tasks WHERE id IN ({marks})", chunk):
                found[task_id] = (rowid, config)
        return found

    def _queue(self, submitter_id: str, endpoint_id: str) -> _Queue:
        rows = self.store.db.execute(
            f"SELECT rowid, state='running' FROM tasks WHERE submitter_id=? AND endpoint_id=?"
            f" AND state IN {UNFINISHED_SQL} ORDER BY rowid", (submitter_id, endpoint_id)).fetchall()
        return _Queue([row[0] for row in rows], [row[1] for row in rows])


class _Queue:
    """One identity's unfinished tasks on one endpoint, in submission order; running ones counted by prefix."""

    def __init__(self, rowids: list[int], running: list[int]) -> None:
        self.rowids = rowids
        self._running_prefix = [0]
        for flag in running:
            self._running_prefix.append(self._running_prefix[-1] + flag)

    def running_before(self, position: int) -> int:
        return self._running_prefix[position]
