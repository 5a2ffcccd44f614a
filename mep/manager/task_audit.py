"""The task log: the router's own JSON-lines record of every task it accepted, routed and saw end.

The router writes it itself (``task_log``, default
``/var/log/mep/router-<endpoint id>/tasks.jsonl``, in a directory the root
half made for the router's account), one record per batch: the tasks of one
dispatch group and function when they are accepted, the tasks queued
for one connected endpoint since its last such record when they are routed
(with the endpoint, account and submitter), and the tasks that ended together with one outcome (a
result's status, a refusal, a loss). It is the router's word: the spawner's
own audit log (root's, out of the router's reach) holds who was allowed to
run as which account.

A task is sent to its endpoint only once its "routed" record is on disk.
Records are written by a writer thread
(``mep.manager.audit_writer.AuditWriter``): each loop turn's records go to it as one
hand-over, and whatever queued up while a write ran goes out as one write
and one ``fdatasync`` (group commit), so the loop never waits for the disk
and the cost is one sync per batch of turns, not per task. Each hand-over
has a number; a task remembers the number its "routed" record went out with
(``QueuedTask.recorded``) and may go once ``durable`` reaches it.

While the log can't be opened or written, ``refusal`` says so: the router
fails the tasks it would route with that message and takes no new ones
(nothing runs unrecorded), and tries again every heartbeat; once a reopen
and a synced record succeed, routing resumes. A renamed log (rotation) is
noticed at the heartbeat too and reopened by path.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mep.manager.flow import QueuedTask
from mep.manager.audit_writer import AuditWriter
from mep.root.audit import AuditLog, Inbox
from mep.root.errors import ConfigurationError
from mep.protocol.messages import TaskGroup, TaskRef

log = logging.getLogger("mep.router")

REFUSAL = "this endpoint is not running tasks right now: its task log can't be written. Ask your admin."


class TaskAuditTrail:
    def __init__(self, path: Path, endpoint_id: str) -> None:
        self.path = path
        self._endpoint_id = endpoint_id
        self._inbox = Inbox()  # the writer thread's news for the loop
        self.wake_fd = self._inbox.wake_read
        self._writer: AuditWriter | None = None
        self._inode: tuple[int, int] | None = None  # (device, inode) of the file opened, to notice a rotation
        self._pending: list[dict[str, Any]] = []
        self._pending_sync = False
        self._next = 1  # the number of the next hand-over
        self.durable = 0  # every hand-over up to this number is on disk
        self.refusal = ""  # non-empty while the log can't be written: nothing is routed
        self._open()

    # --- records ----------------------------------------------------------------------

    def accepted(self, group: TaskGroup, refs: dict[str, TaskRef]) -> None:
        by_function: dict[str, list[str]] = defaultdict(list)
        for task_id in group.task_ids:
            if task_id in refs:
                by_function[refs[task_id].fn_hash].append(task_id)
        for fn_hash, task_ids in by_function.items():
            self._record(outcome="accepted", task_ids=task_ids, fn_hash=fn_hash, submitter_id=group.submitter_id)

    def routed(self, endpoint_id: str, account: str, tasks: Iterable[QueuedTask]) -> None:
        """Record these tasks as routed to the endpoint; each may go once ``is_recorded`` says so."""
        by_submitter: dict[str, list[str]] = defaultdict(list)
        for task in tasks:
            by_submitter[task.submitter_id].append(task.ref.task_id)
            task.recorded = self._next
        for submitter_id, task_ids in by_submitter.items():
            self._record(outcome="routed", task_ids=task_ids, endpoint_id=endpoint_id, account=account,
                         submitter_id=submitter_id)
        self._pending_sync = True

    def is_recorded(self, task: QueuedTask) -> bool:
        return 0 < task.recorded <= self.durable

    def finished(self, task_ids: list[str], outcome: str, *, code: str = "", endpoint_id: str = "",
                 account: str = "") -> None:
        if task_ids:
            self._record(outcome=outcome, task_ids=task_ids, code=code, endpoint_id=endpoint_id, account=account)

    def _record(self, **fields: Any) -> None:
        self._pending.append({"event": "task", **{key: value for key, value in fields.items() if value}})

    # --- writing ----------------------------------------------------------------------

    def flush(self) -> None:
        """Hand this turn's records to the writer (synced if any task waits for them)."""
        if not self._pending:
            return
        number, records, sync = self._next, self._pending, self._pending_sync
        self._next += 1
        self._pending, self._pending_sync = [], False
        if self._writer is None:
            log.error("%d task record(s) lost: the task log %s is not open (%s)", len(records), self.path,
                      self.refusal)
            return
        # Only a synced hand-over can make a task sendable: the others need no word back (a wake-up of the loop).
        self._writer.write(records, sync=sync, then=(lambda written: self._written(number, written)) if sync else None)

    def _written(self, number: int, written: bool) -> None:
        if written:
            self.durable = max(self.durable, number)

    def run_posted(self) -> None:
        """On the loop, when ``wake_fd`` is readable: what the writer thread reported."""
        for callback in self._inbox.take():
            callback()

    def _broke(self) -> None:
        assert self._writer is not None
        self._refuse(self._writer.failure)

    def _refuse(self, reason: str) -> None:
        if not self.refusal:
            log.error("the task log can't be written (%s); no task is routed until it can", reason)
        self.refusal = REFUSAL

    # --- opening, recovery, rotation ----------------------------------------------------

    def _open(self) -> None:
        try:
            audit_log = AuditLog(self.path, trusted_owner_uids=frozenset({os.geteuid()}),
                                 endpoint_id=self._endpoint_id)
        except ConfigurationError as exc:
            self._refuse(str(exc))
            return
        self._inode = _inode(self.path)
        self._writer = AuditWriter(audit_log, post=self._inbox.post, on_broken=self._broke)

    def check(self) -> None:
        """Each heartbeat: retry a broken log, reopen a rotated one."""
        if self._writer is None:
            self._open()
            if self._writer is not None:
                self._restored()
        elif self.refusal or _inode(self.path) != self._inode:
            self._writer.reopen(then=self._reopened)

    def _reopened(self, error: str) -> None:
        if error:
            self._refuse(error)
            return
        self._inode = _inode(self.path)
        if self.refusal:
            self._restored()

    def _restored(self) -> None:
        assert self._writer is not None

        def resume(written: bool) -> None:
            if written and self.refusal:
                self.refusal = ""
                log.info("the task log %s can be written again; routing resumes", self.path)

        self._writer.write([{"event": "task_log_restored"}], sync=True, then=resume)

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
        self.run_posted()
        os.close(self._inbox.wake_read)
        os.close(self._inbox.wake_write)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino
