"""Results above the template's threshold: kept in a file on this host, read back in chunks on request.

The file is written by the worker that ran the task where it shares this
host's disk (``mep.endpoint.bootstrap.ResultFile``: the serialised result is
never whole in the worker's or the endpoint's memory), else by the endpoint
(``keep``). Both run as the account, so the file is the account's (mode 0600
in a 0700 directory): the SDK reads it in place where that path is readable
(the same host or a shared file system), and otherwise the service asks for
it chunk by chunk (``ChunkRead``), which this module answers from the file
without ever holding more than one chunk. Only files under this endpoint's
results directory are served: a read request names a path, and the router
that relays it is not trusted with the account's other files.

Files are removed by a sweep when they are older than the retention
(``large_results.retention``), at start and then hourly while an endpoint of
the account runs; docs/reliability.md says what a reference means when the
file's disk is gone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mep.endpoint.bootstrap import ResultFile, ResultFileError
from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED, Chunk, ChunkRead, LargeResult

if TYPE_CHECKING:
    from mep.config.endpoint import LargeResults
    from mep.endpoint.settings import LargeResultSettings

log = logging.getLogger(__name__)

SWEEP_EVERY = 3600.0
SUFFIX = ".result"
READ_KEEPS_ALIVE = 60.0  # seconds after a chunk read during which the endpoint does not count as idle


class LargeResultFiles:
    def __init__(self, settings: LargeResults | LargeResultSettings, endpoint_id: str, account: str) -> None:
        self.settings = settings
        self.endpoint_id = endpoint_id
        self.account = account
        self.directory = Path(os.path.expanduser(settings.directory)).resolve()
        self._next_sweep = 0.0
        self.last_read = 0.0  # monotonic
        self._kept: dict[str, LargeResult] = {}  # task id -> its file, until its result is sent

    def destination(self, task_id: str) -> tuple[str, int]:
        """Where a task's result goes if it is above the threshold (for a worker that writes it itself)."""
        return str(self.directory / f"{task_id}{SUFFIX}"), self.settings.threshold_bytes

    def keep(self, task_id: str, outcome: Outcome) -> Outcome:
        """Record the file a worker wrote, or write a payload above the threshold (``reference`` then gives it).

        Workers on this host write large results themselves (``ResultFile``), so
        the endpoint never holds those; it writes only what arrives whole: an
        exception above the threshold, an htex or container worker's result.
        Called on the engine's thread: the endpoint's loop keeps heartbeating while a large file is written.
        """
        if outcome.large is not None:
            self._kept[task_id] = self._reference(outcome.large)
            return outcome._replace(large=None)
        if len(outcome.payload) <= self.settings.threshold_bytes:
            return outcome
        try:
            written = ResultFile(*self.destination(task_id))
            written.write(outcome.payload)
            large = written.finish()
        except ResultFileError as exc:
            log.error("could not keep the %d-byte result of task %s: %s", len(outcome.payload), task_id, exc)
            return Outcome(FAILED, code=ErrorCode.LARGE_RESULT_UNAVAILABLE, message=str(exc))
        self._kept[task_id] = self._reference(large)
        return outcome._replace(payload=b"")

    def reference(self, task_id: str) -> LargeResult | None:
        """Where ``keep`` put this task's payload, if it did (once: the result then carries it)."""
        return self._kept.pop(task_id, None)

    def _reference(self, written: tuple[str, int, str]) -> LargeResult:
        path, size, sha256 = written
        return LargeResult(path=path, size=size, sha256=sha256, endpoint_id=self.endpoint_id, account=self.account)

    def read(self, request: ChunkRead) -> tuple[Chunk, list[bytes]]:
        """The chunk asked for, or why it can't be had (the code the SDK raises as LargeResultUnavailableError)."""
        self.last_read = time.monotonic()
        answer = Chunk(fetch_id=request.fetch_id, offset=request.offset)
        large = request.large
        path = Path(large.path) if large else None
        if path is None or path.parent != self.directory or not path.name.endswith(SUFFIX):
            answer.code = ErrorCode.LARGE_RESULT_UNAVAILABLE
            answer.message = (f"{large.path if large else 'no file'} is not a result file of this endpoint's "
                              f"results directory {self.directory} (has the template's large_results.directory "
                              "changed since the result was written?)")
            return answer, []
        try:
            with open(path, "rb", buffering=0) as handle:
                handle.seek(request.offset)
                data = handle.read(request.length)
        except OSError as exc:
            answer.code = ErrorCode.LARGE_RESULT_UNAVAILABLE
            answer.message = (f"the result file {path} on the endpoint's host can't be read "
                              f"({exc.strerror or exc}): it expired (kept {self.settings.retention:.0f} s), was "
                              "removed, or its disk was lost; run the task again")
            return answer, []
        return answer, [data]

    def keeps_alive(self, now: float) -> bool:
        """A fetch in progress keeps the endpoint from idling out under it."""
        return now - self.last_read < READ_KEEPS_ALIVE

    def sweep_if_due(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not list the results directory %s: %s", self.directory, exc)
            return
        oldest = time.time() - self.settings.retention
        removed = 0
        for entry in entries:
            try:
                if entry.name.endswith((SUFFIX, ".partial")) and entry.stat(follow_symlinks=False).st_mtime < oldest:
                    os.unlink(entry.path)
                    removed += 1
            except OSError as exc:
                log.warning("could not remove the expired result file %s: %s", entry.path, exc)
        if removed:
            log.info("removed %d result file(s) older than %.0f s from %s", removed, self.settings.retention,
                     self.directory)
