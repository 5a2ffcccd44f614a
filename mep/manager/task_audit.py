"""The router's half of the audit log: task records for the root spawner, and no task sent before its record.

The router knows the tasks; only the spawner (root) writes the audit log. Each
task gets a record when it is accepted from the service (with its submitter
and function), when it is routed to an endpoint (with the endpoint and
account) and when its outcome is known (a result's status, a refusal, a
loss). Records of one loop turn go to the spawner as one ``AuditTasks``
message (in chunks that fit a datagram).

A task is sent to its endpoint only once the spawner has confirmed that its
"routed" record is on disk (``AuditStatus.confirmed``): until then it stays
queued. One "routed" record covers every task that became ready for one
endpoint in a loop turn (a list of ids), and the spawner writes whatever
arrived meanwhile with one ``fdatasync`` (group commit), so the cost is one
round trip per batch, not per task; the router keeps serving everything else
while a batch waits, and tasks whose records are confirmed go ahead of those
still waiting. While the spawner reports the audit log unwritable,
``refusal`` is the message to fail tasks with instead: nothing runs
unaudited.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from mep.manager.spawner_link import SpawnerLink
from mep.protocol.messages import AuditStatus, AuditTasks, TaskAudit, TaskGroup, TaskRef

log = logging.getLogger("mep.router")

# A record is well under 400 bytes and a task id 36: messages this heavy stay far below the datagram limit.
_WEIGHT_PER_MESSAGE = 1000  # records plus the task ids they list


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

    def cleared(self, endpoint_id: str, account: str, refs: Iterable[TaskRef]) -> set[str]:
        """The ids among ``refs`` whose "routed" record is on disk (they may go); the rest get one record, and wait."""
        refs = list(refs)
        unrecorded = [ref.task_id for ref in refs if ref.task_id not in self._confirmed
                      and ref.task_id not in self._awaiting]
        self._awaiting.update(unrecorded)
        for start in range(0, len(unrecorded), _WEIGHT_PER_MESSAGE - 1):
            self._pending.append(TaskAudit(outcome="routed", task_ids=unrecorded[start:start + _WEIGHT_PER_MESSAGE - 1],
                                           endpoint_id=endpoint_id, account=account))
        return {ref.task_id for ref in refs if ref.task_id in self._confirmed}

    def sent(self, refs: Iterable[TaskRef]) -> None:
        self._confirmed.difference_update(ref.task_id for ref in refs)

    def finished(self, task_id: str, outcome: str, *, code: str = "", endpoint_id: str = "",
                 account: str = "") -> None:
        self._awaiting.discard(task_id)
        self._confirmed.discard(task_id)
        self._pending.append(TaskAudit(task_id=task_id, outcome=outcome, code=code, endpoint_id=endpoint_id,
                                       account=account))

    def flush(self) -> None:
        batch: list[TaskAudit] = []
        weight = 0
        for record in self._pending:
            if batch and weight + 1 + len(record.task_ids) > _WEIGHT_PER_MESSAGE:
                self._spawner.send(AuditTasks(records=batch))
                batch, weight = [], 0
            batch.append(record)
            weight += 1 + len(record.task_ids)
        if batch:
            self._spawner.send(AuditTasks(records=batch))
        self._pending = []

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
