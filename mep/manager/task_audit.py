"""The router's half of the audit log: task records for the root spawner, and no task sent before its record.

The router knows the tasks; only the spawner (root) writes the audit log. Each
task gets a record when it is accepted from the service (with its submitter
and function), when it is routed to an endpoint (with the endpoint and
account) and when its outcome is known (a result's status, a refusal, a
loss). Records of one loop turn go to the spawner as one ``AuditTasks``
message (in chunks that fit a datagram).

A task is sent to its endpoint only once the spawner has confirmed that its
"routed" record is written (``AuditStatus.confirmed``): until then it stays
queued, one round trip to the spawner. While the spawner reports the audit
log unwritable, ``refusal`` is the message to fail tasks with instead: nothing
runs unaudited.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from mep.manager.spawner_link import SpawnerLink
from mep.protocol.messages import AuditStatus, AuditTasks, TaskAudit, TaskGroup, TaskRef

log = logging.getLogger("mep.router")

# A record is well under 400 bytes; this many stay far below the channel's datagram limit.
_RECORDS_PER_MESSAGE = 1000


class TaskAuditTrail:
    def __init__(self, spawner: SpawnerLink) -> None:
        self._spawner = spawner
        self._pending: list[TaskAudit] = []
        self._awaiting: set[str] = set()  # "routed" record sent, not yet confirmed
        self._confirmed: set[str] = set()  # "routed" record written, task not yet sent
        self.refusal = ""  # non-empty while the audit log can't be written

    def accepted(self, group: TaskGroup, refs: dict[str, TaskRef]) -> None:
        self._pending += [TaskAudit(task_id=task_id, outcome="accepted", fn_hash=refs[task_id].fn_hash,
                                    submitter_id=group.submitter_id)
                          for task_id in group.task_ids if task_id in refs]

    def cleared(self, endpoint_id: str, account: str, refs: Iterable[TaskRef]) -> bool:
        """True when every task's "routed" record is confirmed; else records what is missing: wait."""
        cleared = True
        for ref in refs:
            if ref.task_id in self._confirmed:
                continue
            cleared = False
            if ref.task_id not in self._awaiting:
                self._awaiting.add(ref.task_id)
                self._pending.append(TaskAudit(task_id=ref.task_id, outcome="routed", fn_hash=ref.fn_hash,
                                               endpoint_id=endpoint_id, account=account))
        return cleared

    def sent(self, refs: Iterable[TaskRef]) -> None:
        self._confirmed.difference_update(ref.task_id for ref in refs)

    def finished(self, task_id: str, outcome: str, *, code: str = "", endpoint_id: str = "",
                 account: str = "") -> None:
        self._awaiting.discard(task_id)
        self._confirmed.discard(task_id)
        self._pending.append(TaskAudit(task_id=task_id, outcome=outcome, code=code, endpoint_id=endpoint_id,
                                       account=account))

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_RECORDS_PER_MESSAGE], self._pending[_RECORDS_PER_MESSAGE:]
            self._spawner.send(AuditTasks(records=batch))

    def on_status(self, status: AuditStatus) -> None:
        if status.ok and self.refusal:
            log.info("the audit log can be written again; routing resumes")
        elif not status.ok and not self.refusal:
            log.error("the spawner can't write the audit log; tasks are refused until it can")
        self.refusal = "" if status.ok else status.message
        confirmed = self._awaiting.intersection(status.confirmed)
        self._awaiting -= confirmed
        self._confirmed |= confirmed
        if not status.ok:
            self._awaiting.clear()  # their records may never be written: they are failed, not sent
