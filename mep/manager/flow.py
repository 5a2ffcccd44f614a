"""The router's side of flow control: what it holds, and the credit it gives the service.

The router holds a task from the moment the service dispatches it until it is
sent to its user endpoint (or ends there: cancelled, refused, lost): in a
spawn wait, or queued for an endpoint whose window is full. ``HeldWork``
counts those tasks and their bytes (arguments, plus each function body once
while some held task needs it) and turns the room left under the manager's
limits into ``Credit`` for the service: cumulative counts since the last
``REGISTERED``, so a repeated or late credit message changes nothing. Room is
what the limits leave after what is held and what the service may still
send on credit already given, so the router holds at most its limits (plus
one task's bytes, the service's allowed overshoot) whatever the backlog.
Credit outstanding is also kept within one submitter's share (below).

A submitter holding ``share`` of either limit here is listed ``full``: the
service sends no more of its tasks until it drops below. As credit outstanding
never exceeds one share either, a submitter holds less than two shares, which
keeps room for everyone else's tasks (a spawn for another user is never stuck
behind one user's backlog). Function bodies no held task needs are dropped and named in
``forget``, so the service sends them again with the next task that uses them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mep.protocol.messages import Credit, Runtime, TaskRef


@dataclass
class QueuedTask:
    ref: TaskRef
    args: Any  # zmq.Frame
    runtime: Runtime
    submitter_id: str
    assertion: str = ""  # the group's signed identity assertion, which the endpoint checks
    recorded: int = 0  # the task log hand-over its "routed" record went out with (0: not yet routed)


class HeldWork:
    def __init__(self, max_tasks: int, max_bytes: int, share: float) -> None:
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self.share = share
        self.functions: dict[str, Any] = {}  # fn hash -> body frame, while a held task needs it
        self._function_refs: Counter[str] = Counter()
        self._forgotten: set[str] = set()
        self.tasks = 0
        self.bytes = 0  # held arguments and function bodies
        self.by_submitter: Counter[str] = Counter()
        self.bytes_by_submitter: Counter[str] = Counter()  # their arguments
        self._granted_tasks = self._granted_bytes = 0  # cumulative since REGISTERED
        self._received_tasks = self._received_bytes = 0
        self._last_sent: Credit | None = None

    # --- what is held -------------------------------------------------------------

    def offer_function(self, fn_hash: str, body: Any) -> None:
        """A body the service sent; kept only if a task is held for it (see ``prune``)."""
        if fn_hash not in self.functions:
            self.functions[fn_hash] = body
            self.bytes += len(body)
            self._forgotten.discard(fn_hash)

    def hold(self, tasks: Iterable[QueuedTask]) -> None:
        for task in tasks:
            self.tasks += 1
            self.bytes += len(task.args)
            self.by_submitter[task.submitter_id] += 1
            self.bytes_by_submitter[task.submitter_id] += len(task.args)
            self._function_refs[task.ref.fn_hash] += 1

    def release(self, tasks: Iterable[QueuedTask]) -> None:
        """These tasks left the router (sent to their endpoint, or ended): their room is free again."""
        for task in tasks:
            self.tasks -= 1
            self.bytes -= len(task.args)
            self.by_submitter[task.submitter_id] -= 1
            self.bytes_by_submitter[task.submitter_id] -= len(task.args)
            if self.by_submitter[task.submitter_id] <= 0:
                del self.by_submitter[task.submitter_id], self.bytes_by_submitter[task.submitter_id]
            self._function_refs[task.ref.fn_hash] -= 1
            if self._function_refs[task.ref.fn_hash] <= 0:
                del self._function_refs[task.ref.fn_hash]
                self._drop_function(task.ref.fn_hash)

    def prune(self) -> None:
        """Drop bodies that arrived without a held task to need them."""
        for fn_hash in [h for h in self.functions if h not in self._function_refs]:
            self._drop_function(fn_hash)

    def _drop_function(self, fn_hash: str) -> None:
        body = self.functions.pop(fn_hash, None)
        if body is not None:
            self.bytes -= len(body)
            self._forgotten.add(fn_hash)

    # --- credit ---------------------------------------------------------------------

    def received(self, tasks: int, payload_bytes: int) -> None:
        self._received_tasks += tasks
        self._received_bytes += payload_bytes

    def registered(self) -> None:
        """REGISTERED: both sides count credit afresh from here."""
        self._granted_tasks = self._granted_bytes = self._received_tasks = self._received_bytes = 0
        self._last_sent = None

    def credit(self, *, again: bool = False) -> Credit | None:
        """A ``Credit`` to send when there is news (more room, a change in who is full, dropped bodies), or
        always with ``again`` (the heartbeat repeats it, in case one was lost)."""
        outstanding_tasks = max(0, self._granted_tasks - self._received_tasks)
        outstanding_bytes = max(0, self._granted_bytes - self._received_bytes)
        # Credit given is not yet anyone's: cap it at one submitter's share, so that one submitter can never take
        # more than twice its share (its share, then the credit outstanding when it got there).
        room_tasks = min(self.max_tasks - self.tasks, int(self.share * self.max_tasks)) - outstanding_tasks
        room_bytes = min(self.max_bytes - self.bytes, int(self.share * self.max_bytes)) - outstanding_bytes
        if room_tasks > 0 and room_bytes > 0:
            self._granted_tasks += room_tasks
            self._granted_bytes += room_bytes
        full = sorted(submitter for submitter, count in self.by_submitter.items()
                      if count >= self.share * self.max_tasks
                      or self.bytes_by_submitter[submitter] >= self.share * self.max_bytes)
        credit = Credit(tasks=self._granted_tasks, payload_bytes=self._granted_bytes, full=full,
                        forget=sorted(self._forgotten))
        last = self._last_sent
        if not again and last is not None and not credit.forget and (
                (last.tasks, last.payload_bytes, last.full) == (credit.tasks, credit.payload_bytes, credit.full)):
            return None
        self._forgotten.clear()
        self._last_sent = credit
        return credit
