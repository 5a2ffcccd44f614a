"""Group commit: a reply waits for the fsync that makes what it confirms durable; the broker's loop does not.

The loop commits each turn without an fsync (``Store.transaction(sync=False)``),
forwards the turn's tasks, and hands the turn's replies here. An ``fdatasync``
of the WAL then runs on a thread of its own while the loop goes on receiving,
committing and dispatching; once a sync that began after a turn's commit has
returned, that turn's replies are released, in the order they were held. A
sync covers every commit before it began, so one sync releases every turn
committed before it, and a result that arrives while a sync is running gets
a second sync at once instead of waiting for the first to finish: a
sequential call pays about one fsync, not two. With ``MAX_SYNCS_IN_FLIGHT``
running, the broker stops reading new messages until one returns
(``saturated``): under load, messages then gather into large turns, each
committed once, as they did when the fsync blocked the loop.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from typing import Generic, TypeVar

from mep.service.store import Store, fdatasync_and_close

Held = TypeVar("Held")

MAX_SYNCS_IN_FLIGHT = 2  # a second overlapping fsync shortens a sequential call; more would only add disk flushes


class GroupCommit(Generic[Held]):
    def __init__(self, store: Store) -> None:
        self.store = store
        self.wake_fd, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # readable when a sync returned
        self._requests: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()  # (covers, descriptor)
        self._returned: deque[tuple[int, OSError | None]] = deque()  # (covers, error), appended by the threads
        self._covered_in_flight: list[int] = []  # what each sync in flight covers
        self._held: deque[tuple[int, Held]] = deque()  # (commits it waits for, item), oldest first
        self._threads = [threading.Thread(target=self._run_syncs, name=f"mep-fsync-{n}", daemon=True)
                         for n in range(MAX_SYNCS_IN_FLIGHT)]
        for thread in self._threads:
            thread.start()

    @property
    def saturated(self) -> bool:
        """Every sync thread is busy: read no new messages until one returns (they join the next turn)."""
        return len(self._covered_in_flight) >= MAX_SYNCS_IN_FLIGHT

    def hold(self, item: Held) -> None:
        """Keep ``item`` until everything committed so far is durable (see ``released``)."""
        self._held.append((self.store.commits, item))
        self._start_sync()

    def released(self) -> list[Held]:
        """Items whose commits are now durable, in the order held; none ever again once a sync failed."""
        try:
            os.read(self.wake_fd, 4096)  # always: a wake-up may outlive the sync it announced
        except BlockingIOError:
            pass
        while self._returned:  # in any order: each covers what it was started for
            covers, error = self._returned.popleft()
            self._covered_in_flight.remove(covers)
            self.store.end_sync(covers, error)
        if self.store.sync_failure is not None:
            return []
        ready = []
        while self._held and self._held[0][0] <= self.store.durable_commits:
            ready.append(self._held.popleft()[1])
        self._start_sync()
        return ready

    def close(self) -> None:
        """Let the syncs in flight finish (what they would release is dropped: its senders send it again)."""
        for _ in self._threads:
            self._requests.put(None)
        for thread in self._threads:
            thread.join()
        os.close(self.wake_fd)
        os.close(self._wake_write)

    def _start_sync(self) -> None:
        if not self._held or self.saturated or self.store.sync_failure is not None:
            return
        covered = max([self.store.durable_commits, *self._covered_in_flight])
        if self._held[-1][0] <= covered:
            return  # a sync in flight covers it
        covers, descriptor = self.store.begin_sync()
        self._covered_in_flight.append(covers)
        self._requests.put((covers, descriptor))

    def _run_syncs(self) -> None:
        """A sync thread: fdatasync what it is handed, say so, and wake the broker's loop."""
        while (request := self._requests.get()) is not None:
            covers, descriptor = request
            self._returned.append((covers, fdatasync_and_close(descriptor)))
            try:
                os.write(self._wake_write, b".")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already
