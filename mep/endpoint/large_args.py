"""A task's uploaded arguments, fetched from the service in chunks before the task runs.

A task whose arguments were uploaded (``TaskRef.large_args``) arrives
without them. The endpoint asks its router for them ``CHUNK_BYTES`` at a
time, at most ``WINDOW`` requests outstanding, and writes each chunk where it
belongs in a file of the account (mode 0600 in the large-results directory,
0700), so its memory holds a few chunks while they arrive; a chunk not
answered in time is asked for again from its offset (what arrived stays).
Chunks are hashed in order as they arrive (one that comes early waits in
memory for those before it, so at most ``WINDOW`` chunks are ahead), and the
whole is checked against the SHA-256 the service recorded. Then the task
goes to the engine: to one whose workers share this disk
(``reads_argument_files``) as ``(path, size, sha256)``, the worker loading
the file itself and the engine removing it when the task ends, so the
endpoint never holds the arguments; to any other as bytes, the file
removed and its open descriptor read back whole on a thread of its own.
At most ``CONCURRENT`` tasks fetch at once; others wait their turn, holding
nothing. docs/user.md, "Large arguments".
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mep.endpoint.worker import Outcome
from mep.errors import ErrorCode
from mep.protocol.messages import FAILED, Chunk, ChunkRequest, LargeArgs

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
WINDOW = 4
CONCURRENT = 2
ASK_TIMEOUT = 30.0  # seconds a chunk request may go unanswered before it is asked again
ASKS_PER_CHUNK = 3
SUFFIX = ".args"

ArgumentFile = tuple[str, int, str]  # a fetched and checked arguments file: (path, size, sha256)


@dataclass
class _Fetch:
    task_id: str
    large: LargeArgs
    then: Callable[[bytes | ArgumentFile], None]
    as_file: bool
    fd: int = -1
    next_offset: int = 0
    received: int = 0
    hashed_to: int = 0
    hash: Any = field(default_factory=hashlib.sha256)
    early: dict[int, Any] = field(default_factory=dict)  # offset -> a chunk that came before those in front of it
    outstanding: dict[int, tuple[int, float, int]] = field(default_factory=dict)  # request id -> offset, at, times


class ArgumentFetches:
    def __init__(self, directory: Path, send: Callable[[ChunkRequest], None],
                 failed: Callable[[str, Outcome], None]) -> None:
        """``send``: a request to the router; ``failed``: a task whose arguments can't be had ends so."""
        self.directory = directory
        self._send = send
        self._failed = failed
        self._waiting: deque[_Fetch] = deque()
        self._active: dict[str, _Fetch] = {}
        self._requests: dict[int, str] = {}  # request id -> task id
        self._ids = itertools.count(1)

    def fetch(self, task_id: str, large: LargeArgs, then: Callable[[bytes | ArgumentFile], None],
              as_file: bool = False) -> None:
        """Fetch the arguments, then call ``then(arguments)`` (or fail the task with why).

        ``as_file``: ``then`` gets ``(path, size, sha256)`` of the checked file, which is then its to remove.
        """
        self._waiting.append(_Fetch(task_id, large, then, as_file))
        self._start_waiting()

    def cancel(self, task_id: str) -> bool:
        """Stop fetching a cancelled task's arguments; True if they were being (or waiting to be) fetched."""
        waiting = [fetch for fetch in self._waiting if fetch.task_id == task_id]
        for fetch in waiting:
            self._waiting.remove(fetch)
        active = self._active.get(task_id)
        if active is not None:
            self._end(active)
        return bool(waiting) or active is not None

    def _start_waiting(self) -> None:
        while self._waiting and len(self._active) < CONCURRENT:
            fetch = self._waiting.popleft()
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                fetch.fd = os.open(self.directory / f"{fetch.task_id}{SUFFIX}",
                                   os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                self._failed(fetch.task_id, Outcome(FAILED, code=ErrorCode.LARGE_ARGS_UNAVAILABLE, message=(
                    f"the task's {fetch.large.size} bytes of uploaded arguments could not be written to "
                    f"{self.directory} on the endpoint's host ({exc.strerror or exc}); the template's "
                    "large_results.directory must be writable, with room for them")))
                continue
            self._active[fetch.task_id] = fetch
            self._fill_window(fetch)

    def _ask(self, fetch: _Fetch, offset: int, times: int) -> None:
        request_id = next(self._ids)
        self._requests[request_id] = fetch.task_id
        fetch.outstanding[request_id] = (offset, time.monotonic(), times)
        self._send(ChunkRequest(request_id=request_id, task_id=fetch.task_id, offset=offset,
                                length=min(CHUNK_BYTES, fetch.large.size - offset)))

    def _fill_window(self, fetch: _Fetch) -> None:
        while (len(fetch.outstanding) < WINDOW and fetch.next_offset < fetch.large.size
               and fetch.next_offset - fetch.hashed_to < WINDOW * CHUNK_BYTES):
            self._ask(fetch, fetch.next_offset, 1)
            fetch.next_offset += CHUNK_BYTES

    def received(self, chunk: Chunk, payloads: list[Any]) -> None:
        task_id = self._requests.pop(chunk.request_id, None)
        fetch = self._active.get(task_id or "")
        if fetch is None or chunk.request_id not in fetch.outstanding:
            return  # the answer to a request asked again meanwhile, or of a fetch that ended
        offset = fetch.outstanding.pop(chunk.request_id)[0]
        if chunk.code:
            self._fail(fetch, chunk.code, chunk.message)
            return
        data = payloads[0].buffer if payloads else b""
        expected = min(CHUNK_BYTES, fetch.large.size - offset)
        if len(data) != expected:
            self._fail(fetch, ErrorCode.LARGE_ARGS_UNAVAILABLE,
                       f"the service sent {len(data)} bytes of the task's uploaded arguments at offset {offset}, "
                       f"not {expected}; submit the task again")
            return
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(fetch.fd, data[written:], offset + written)
        except OSError as exc:
            self._fail(fetch, ErrorCode.LARGE_ARGS_UNAVAILABLE,
                       f"the task's uploaded arguments could not be written to {self.directory} on the endpoint's "
                       f"host ({exc.strerror or exc}); it needs {fetch.large.size} bytes free there")
            return
        fetch.received += len(data)
        fetch.early[offset] = data
        while fetch.hashed_to in fetch.early:
            in_order = fetch.early.pop(fetch.hashed_to)
            fetch.hash.update(in_order)
            fetch.hashed_to += len(in_order)
        if fetch.received == fetch.large.size:
            self._finish(fetch)
        else:
            self._fill_window(fetch)

    def _finish(self, fetch: _Fetch) -> None:
        if fetch.hash.hexdigest() != fetch.large.sha256:
            self._fail(fetch, ErrorCode.LARGE_ARGS_UNAVAILABLE, "the task's arguments fetched from the service do "
                       "not match the SHA-256 they were uploaded under; submit the task again")
            return
        log.info("fetched the %d bytes of uploaded arguments of task %s", fetch.large.size, fetch.task_id)
        if fetch.as_file:
            self._end(fetch, keep_file=True)
            fetch.then((str(self.directory / f"{fetch.task_id}{SUFFIX}"), fetch.large.size, fetch.large.sha256))
            return
        # Read back on a thread of its own: for GiBs that takes seconds, during which the endpoint's loop must
        # keep heartbeating (``then`` may be called from any thread).
        handle = os.fdopen(os.dup(fetch.fd), "rb")
        self._end(fetch)

        def load() -> None:
            with handle:
                handle.seek(0)
                fetch.then(handle.read())

        threading.Thread(target=load, name=f"mep-args-{fetch.task_id[:8]}", daemon=True).start()

    def _fail(self, fetch: _Fetch, code: str, message: str) -> None:
        self._end(fetch)
        log.warning("task %s fails: its uploaded arguments can't be had: %s", fetch.task_id, message)
        self._failed(fetch.task_id, Outcome(FAILED, code=code, message=message))

    def _end(self, fetch: _Fetch, keep_file: bool = False) -> None:
        """Forget the fetch and (unless the engine takes it) remove its file; the next waiting one starts."""
        del self._active[fetch.task_id]
        for request_id in fetch.outstanding:
            self._requests.pop(request_id, None)
        fetch.early.clear()
        os.close(fetch.fd)
        if not keep_file:
            remove_argument_file(self.directory / f"{fetch.task_id}{SUFFIX}")
        self._start_waiting()

    def ask_again_if_late(self, now: float) -> None:
        for fetch in list(self._active.values()):
            for request_id, (offset, asked_at, times) in list(fetch.outstanding.items()):
                if now - asked_at < ASK_TIMEOUT:
                    continue
                if times >= ASKS_PER_CHUNK:
                    self._fail(fetch, ErrorCode.LARGE_ARGS_UNAVAILABLE,
                               f"no answer from the service for bytes {offset}.. of the task's uploaded arguments "
                               f"after asking {times} times {ASK_TIMEOUT:.0f} s apart")
                    break
                del fetch.outstanding[request_id]
                self._requests.pop(request_id, None)
                self._ask(fetch, offset, times + 1)


def remove_argument_file(path: str | Path) -> None:
    """A task's fetched arguments are not needed any more (it ended, or it never got them)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove the arguments file %s: %s", path, exc)
