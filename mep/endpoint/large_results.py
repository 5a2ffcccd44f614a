"""Results above the template's threshold: kept in a file on this host, read back in chunks on request.

The endpoint runs as the account, so the file is the account's (mode 0600
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

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

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

    def keep(self, task_id: str, outcome: Outcome) -> Outcome:
        """Above the threshold, the payload goes to a file (``reference`` then gives it) and leaves the outcome.

        Called on the engine's thread: the endpoint's loop keeps heartbeating while a large file is written.
        """
        if len(outcome.payload) <= self.settings.threshold_bytes:
            return outcome
        try:
            large = self._write(task_id, outcome.payload)
        except OSError as exc:
            log.error("could not keep the %d-byte result of task %s in %s: %s", len(outcome.payload), task_id,
                      self.directory, exc)
            return Outcome(FAILED, code=ErrorCode.LARGE_RESULT_UNAVAILABLE, message=(
                f"the result is {len(outcome.payload)} bytes, above the endpoint's large-result threshold of "
                f"{self.settings.threshold_bytes}, and could not be written to {self.directory}: "
                f"{exc.strerror or exc}"))
        self._kept[task_id] = large
        return outcome._replace(payload=b"")

    def reference(self, task_id: str) -> LargeResult | None:
        """Where ``keep`` put this task's payload, if it did (once: the result then carries it)."""
        return self._kept.pop(task_id, None)

    def _write(self, task_id: str, payload: bytes) -> LargeResult:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{task_id}{SUFFIX}"
        partial = path.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())  # the reference the service stores must not outlive a crash's page cache
        os.replace(partial, path)
        return LargeResult(path=str(path), size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                           endpoint_id=self.endpoint_id, account=self.account)

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
