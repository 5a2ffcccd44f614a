"""Results kept in a file on the endpoint's host: read in place, or fetched in chunks through the service.

A result above the endpoint's threshold arrives as a reference
(``Result.large``: path, size, SHA-256). Where this process can read that
path (the same host, a shared file system) and the file is the one the
endpoint wrote (size and checksum match), it is read in place. Otherwise, or
with ``read_results_locally=False``, it is fetched through the service,
``CHUNK_BYTES`` at a time with at most ``WINDOW`` requests outstanding (the
credit that bounds what every hop holds), each request naming its offset, so
a chunk lost on the way is asked for again from where it was. docs/user.md,
"Large results".
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, BinaryIO

import zmq

from mep.errors import LargeResultNoReaderError, LargeResultUnavailableError, ServiceUnreachableError, error_for_code
from mep.protocol import decode, encode
from mep.protocol.messages import Chunk, ChunkRequest, Error, LargeResult, Result, ResultsAck, TaskQuery
from mep.sdk.connection import ServiceSettings, request

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
WINDOW = 4  # chunk requests outstanding at once
ASKS_PER_CHUNK = 3  # a chunk not answered within the timeout is asked for again, this many times in all


def payload_of(result: Result, payload: bytes | None, settings: ServiceSettings, *, read_locally: bool,
               timeout: float) -> bytes | BinaryIO | None:
    """The result's payload: bytes from the message, or a file object over the result file (in place or fetched).

    A file object, so that ``mep.sdk.serialize.deserialize`` unpickles as it reads and the serialised bytes
    are never held beside the value: read in place, or from the temporary file a fetch writes.
    """
    large = result.large
    if large is None:
        return payload
    if read_locally:
        handle = _open_in_place(large)
        if handle is not None:
            return handle
    return fetch(settings, result.task_id, large, timeout)


def _open_in_place(large: LargeResult) -> BinaryIO | None:
    """The file, at its start, if it is readable here and is the one the endpoint wrote; None to fetch instead.

    Checked by hashing it a chunk at a time, then read again by the unpickler (from the page cache, mostly):
    twice the reading, but never the file in memory. The file is the account's own (0600 in a 0700
    directory), so only the account could change it between the check and the load.
    """
    try:
        handle = open(large.path, "rb")
    except OSError as exc:
        log.debug("result file %s not readable here (%s); fetching it through the service", large.path, exc)
        return None
    try:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        size = handle.tell()
        handle.seek(0)
    except OSError as exc:
        handle.close()
        log.debug("result file %s not readable here (%s); fetching it through the service", large.path, exc)
        return None
    if size != large.size or digest != large.sha256:
        handle.close()
        log.info("%s here is not the result file the endpoint wrote (another host's path?); fetching it through "
                 "the service", large.path)
        return None
    return handle


def fetch(settings: ServiceSettings, task_id: str, large: LargeResult, timeout: float) -> BinaryIO:
    """Every chunk of the file, through the service, into an unnamed temporary file (``TMPDIR``), checked against
    the reference's size and SHA-256, and returned at its start.

    A file rather than a buffer: the unpickler then reads it while it builds the value, so this process holds
    the value alone, never the serialised bytes beside it. The file has no name (it goes when it is closed).
    """
    spool = tempfile.TemporaryFile(prefix=f"mep-result-{task_id}-")
    try:
        socket, watch = settings.connect(zmq.Context.instance())
        try:
            _ChunkedFetch(socket, watch, settings, task_id, large, timeout, spool).run()
        finally:
            watch.close(socket)
            socket.close(linger=0)
        spool.seek(0)
        digest = hashlib.file_digest(spool, "sha256").hexdigest()
        spool.seek(0)
    except OSError as exc:
        spool.close()
        raise LargeResultUnavailableError(
            f"the result of task {task_id} ({large.size} bytes) could not be kept in a temporary file while it was "
            f"fetched: {exc}; free space in {tempfile.gettempdir()} or point TMPDIR at a directory with room") from exc
    except BaseException:
        spool.close()
        raise
    if digest != large.sha256:
        spool.close()
        raise LargeResultUnavailableError(
            f"the result of task {task_id} fetched from {large.path} does not match the checksum the endpoint "
            "recorded (the file changed after it was written); run the task again")
    return spool


class _ChunkedFetch:
    def __init__(self, socket: zmq.Socket, watch: Any, settings: ServiceSettings, task_id: str, large: LargeResult,
                 timeout: float, spool: BinaryIO) -> None:
        self.socket, self.watch, self.settings = socket, watch, settings
        self.task_id, self.large, self.timeout = task_id, large, timeout
        self.spool = spool  # each chunk is written at its offset: chunks may arrive in any order
        self.next_offset = 0
        self.outstanding: dict[int, tuple[int, float, int]] = {}  # request id -> (offset, asked at, times asked)
        self.request_ids = 0

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)
        self._fill_window()
        while self.outstanding:
            poller.poll(200)  # short slices: Ctrl-C gets through
            self.watch.check()
            while self.socket.poll(0):
                self._receive(*decode(self.socket.recv_multipart(copy=False)))
            self._ask_again_if_late()
            self._fill_window()

    def _ask(self, offset: int, times: int) -> None:
        self.request_ids += 1
        length = min(CHUNK_BYTES, self.large.size - offset)
        self.socket.send_multipart(encode(ChunkRequest(token=self.settings.token, request_id=self.request_ids,
                                                       task_id=self.task_id, offset=offset, length=length)))
        self.outstanding[self.request_ids] = (offset, time.monotonic(), times)

    def _fill_window(self) -> None:
        while len(self.outstanding) < WINDOW and self.next_offset < self.large.size:
            self._ask(self.next_offset, 1)
            self.next_offset += CHUNK_BYTES

    def _ask_again_if_late(self) -> None:
        now = time.monotonic()
        for request_id, (offset, asked_at, times) in list(self.outstanding.items()):
            if now - asked_at < self.timeout:
                continue
            if times >= ASKS_PER_CHUNK:
                raise ServiceUnreachableError(
                    f"no answer for bytes {offset}.. of the result of task {self.task_id} after asking "
                    f"{times} times {self.timeout:.0f} s apart; {self.settings.no_answer_message(self.timeout)}")
            del self.outstanding[request_id]
            self._ask(offset, times + 1)  # resumed from its offset; what arrived already stays

    def _receive(self, header: Any, payloads: list[Any]) -> None:
        asked = self.outstanding.pop(getattr(header, "request_id", 0), None)
        if asked is None:
            return  # the answer to a request asked again meanwhile
        if isinstance(header, Error):
            raise error_for_code(header.code, header.message)
        if not isinstance(header, Chunk):
            raise LargeResultUnavailableError(f"the service answered a chunk request with {type(header).__name__}")
        if header.code:
            raise error_for_code(header.code, header.message)
        offset = asked[0]
        expected = min(CHUNK_BYTES, self.large.size - offset)
        chunk = payloads[0].buffer if payloads else b""
        if len(chunk) != expected:
            raise LargeResultUnavailableError(
                f"the result file {self.large.path} of task {self.task_id} is shorter than the {self.large.size} "
                "bytes the endpoint recorded (it was truncated after it was written); run the task again")
        view = memoryview(chunk)
        while view:  # a short write (a filling disk) goes on from where it stopped; a full one raises OSError
            written = os.pwrite(self.spool.fileno(), view, offset)
            view, offset = view[written:], offset + written


class BackgroundLoader:
    """Loads large results for an Executor off its I/O thread, which must keep serving other results."""

    def __init__(self, settings: ServiceSettings, read_locally: bool, timeout: float,
                 start_endpoint: Callable[[], None], threads: int = 2) -> None:
        """``start_endpoint``: runs a task on the endpoint, to start one that can read the file."""
        self.settings = settings
        self.read_locally = read_locally
        self.timeout = timeout
        self.start_endpoint = start_endpoint
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="mep-large-result")

    def load(self, result: Result, settle: Callable[[Result, bytes | BinaryIO | None, BaseException | None], None]) -> None:
        """``settle(result, payload, None)`` once it is loaded, ``settle(result, None, error)`` if it can't be."""
        def load() -> bytes | BinaryIO | None:
            return payload_of(result, None, self.settings, read_locally=self.read_locally, timeout=self.timeout)

        def run() -> None:
            try:
                try:
                    payload = load()
                except LargeResultNoReaderError:  # the endpoint idled out since: start one, then fetch again
                    self.start_endpoint()
                    payload = load()
            except Exception as exc:  # noqa: BLE001 - whatever it is, the future must learn of it
                settle(result, None, exc)
                return
            settle(result, payload, None)

        self._pool.submit(run)


def nothing() -> None:
    """The task that starts an endpoint able to read a large result's file."""


def acknowledge(settings: ServiceSettings, task_ids: list[str], timeout: float) -> None:
    """Tell the service these results are in hand; the reply to a query after it proves it arrived."""
    request(settings, TaskQuery(token=settings.token, request_id=1, limit=1), timeout,
            preceded_by=[ResultsAck(token=settings.token, task_ids=task_ids)])
