"""The router's task-log writer: one thread that writes ``AuditLog`` records with group commit.

Records are written in the order they were handed over, and whatever queued
up while the previous write ran goes out as one write and, when any of it
must be durable, one ``fdatasync`` (group commit), so the router's loop never
waits for a disk. Each hand-over says what to do once its records are on disk
(run on the loop through an ``audit.Inbox``). Not root code: the root spawner
writes its own audit log synchronously (``mep.root.audit``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mep.root.audit import AuditLog
from mep.root.errors import ConfigurationError

log = logging.getLogger("mep.router")


@dataclass
class _Write:
    records: list[Mapping[str, Any]]
    sync: bool
    then: Callable[[bool], None] | None = None  # run on the router's loop with "written"


@dataclass
class _Reopen:
    then: Callable[[str], None]  # run on the router's loop with "" or why the reopen failed


@dataclass
class AuditWriter:
    """The log's one writer thread; ``post`` runs a callable on the router's loop.

    ``on_broken`` (on the loop) is called once each time the log goes from
    working to broken. Everything is called from the loop.
    """

    log: AuditLog
    post: Callable[[Callable[[], None]], None]
    on_broken: Callable[[], None] = lambda: None
    _queue: queue.SimpleQueue[_Write | _Reopen | None] = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _closed: bool = False

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    @property
    def failure(self) -> str:
        return self.log.failure

    def write(self, records: list[Mapping[str, Any]], *, sync: bool = False,
              then: Callable[[bool], None] | None = None) -> None:
        self._put(_Write(records, sync, then))

    def reopen(self, then: Callable[[str], None]) -> None:
        self._put(_Reopen(then))

    def close(self) -> None:
        """Write what is queued, then stop the thread; later records are dropped (the router is exiting)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)  # nothing is queued behind it
        if self._thread is not None:
            self._thread.join()
        self.log.close()

    def _put(self, item: _Write | _Reopen) -> None:
        if not self._closed:
            self._queue.put(item)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            group: list[_Write] = []
            for item in items:
                if isinstance(item, _Write):
                    group.append(item)
                    continue
                self._commit(group)
                group = []
                if item is None:
                    return
                self._reopen(item)
            self._commit(group)

    def _commit(self, group: list[_Write]) -> None:
        if not group:
            return
        ok = False
        if not self.log.failure:
            try:
                self.log.write_records([r for item in group for r in item.records],
                                       sync=any(item.sync for item in group))
                ok = True
            except OSError:
                log.error("%s can't be written (%s); it is tried again each heartbeat and on SIGHUP",
                          self.log.path, self.log.failure)
                self.post(self.on_broken)
            except Exception as exc:  # a bug (a record json can't encode): the thread must live on
                log.exception("an audit record could not be written")
                self.log.failure = f"an audit record could not be encoded: {exc!r}"
                self.post(self.on_broken)
        for item in group:
            if item.then is not None:
                self.post(lambda then=item.then: then(ok))

    def _reopen(self, item: _Reopen) -> None:
        try:
            self.log.reopen()
            error = ""
        except ConfigurationError as exc:
            self.log.failure = str(exc)
            error = str(exc)
        self.post(lambda: item.then(error))
