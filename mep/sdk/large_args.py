"""Arguments above the Executor's threshold: uploaded to the service in chunks, then submitted by reference.

The serialised arguments are sent ``CHUNK_BYTES`` at a time with at most
``WINDOW`` chunks unacknowledged (the credit that bounds what the service
holds in memory); the service acknowledges a chunk once it is on its disk and
says how much of the upload it holds, so an upload interrupted by a service
restart (or begun again by another submission of the same bytes) goes on from
there instead of from the start: the first chunk goes alone, and its answer
says where to go on. The upload is named by its SHA-256, which the service
checks; the task's SUBMIT then carries only that name and size
(``TaskRef.large_args``), and the endpoint fetches the bytes before the task
runs. docs/user.md, "Large arguments".
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from mep.errors import LargeArgsUnavailableError, ServiceUnreachableError, error_for_code
from mep.protocol import decode, encode
from mep.protocol.messages import Error, LargeArgs, Upload, UploadAck
from mep.sdk.connection import ServiceSettings
from mep.sdk.large_results import CHUNK_BYTES, WINDOW

log = logging.getLogger(__name__)

UPLOAD_ABOVE = 1024 * 1024  # the Executor's default threshold: serialised arguments larger than this are uploaded


def upload(settings: ServiceSettings, data: bytes | memoryview, resend_after: float,
           answer_timeout: float) -> tuple[LargeArgs, int]:
    """Upload ``data``; (its reference, how many bytes were sent: fewer than its size when resumed).

    A chunk not acknowledged within ``resend_after`` seconds is sent again; ``ServiceUnreachableError``
    when the service has acknowledged nothing new for ``answer_timeout`` seconds.
    """
    large = LargeArgs(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    socket, watch = settings.connect(zmq.Context.instance())
    try:
        sent = _ChunkedUpload(socket, watch, settings, memoryview(data), large, resend_after, answer_timeout).run()
    finally:
        watch.close(socket)
        socket.close(linger=0)
    return large, sent


class _ChunkedUpload:
    def __init__(self, socket: zmq.Socket, watch: Any, settings: ServiceSettings, data: memoryview,
                 large: LargeArgs, resend_after: float, answer_timeout: float) -> None:
        self.socket, self.watch, self.settings = socket, watch, settings
        self.data, self.large = data, large
        self.resend_after, self.answer_timeout = resend_after, answer_timeout
        self.received = 0  # bytes the service holds on its disk, as it last said
        self.next_offset = 0
        self.outstanding: dict[int, tuple[int, float]] = {}  # request id -> (offset, sent at)
        self.request_ids = 0
        self.resent_after = 0  # acknowledgements of requests up to this one predate the last resend
        self.bytes_sent = 0
        self.progress_at = time.monotonic()
        self.answered = False

    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)
        self._fill_window()
        while self.received < self.large.size:
            poller.poll(200)  # short slices: Ctrl-C gets through
            self.watch.check()
            while self.socket.poll(0):
                self._receive(*decode(self.socket.recv_multipart(copy=False)))
            self._resend_if_late()
            self._fill_window()
        return self.bytes_sent

    def _fill_window(self) -> None:
        # One chunk until the service has answered: its answer says how much it holds already (a resumed upload)
        window = WINDOW if self.answered else 1
        while len(self.outstanding) < window and self.next_offset < self.large.size:
            offset = self.next_offset
            chunk = self.data[offset:offset + CHUNK_BYTES]
            self.request_ids += 1
            self.socket.send_multipart(encode(Upload(token=self.settings.token, request_id=self.request_ids,
                                                     sha256=self.large.sha256, size=self.large.size, offset=offset),
                                              [chunk]), copy=False)
            self.outstanding[self.request_ids] = (offset, time.monotonic())
            self.next_offset += len(chunk)
            self.bytes_sent += len(chunk)

    def _from(self, offset: int) -> None:
        """Send again from ``offset`` on; answers to what was sent before are not taken for losses."""
        self.next_offset = offset
        self.outstanding.clear()
        self.resent_after = self.request_ids

    def _resend_if_late(self) -> None:
        now = time.monotonic()
        if now - self.progress_at > self.answer_timeout:
            raise ServiceUnreachableError(
                f"the service stored no more of the {self.large.size}-byte arguments after {self.received} bytes "
                f"for {self.answer_timeout:.0f} s; {self.settings.no_answer_message(self.answer_timeout)}")
        if any(now - sent_at > self.resend_after for _, sent_at in self.outstanding.values()):
            log.info("the service has not acknowledged upload chunks for %.0f s; sending again from byte %d",
                     self.resend_after, self.received)
            self._from(self.received)

    def _receive(self, header: Any, _payloads: list[Any]) -> None:
        request_id = getattr(header, "request_id", 0)
        if isinstance(header, Error):
            raise error_for_code(header.code, header.message)
        if not isinstance(header, UploadAck):
            raise LargeArgsUnavailableError(f"the service answered an upload with {type(header).__name__}")
        self.outstanding.pop(request_id, None)
        self.answered = True
        if header.received > self.received:
            self.received = header.received
            self.progress_at = time.monotonic()
        if header.received < header.offset and request_id > self.resent_after:
            self._from(self.received)  # a chunk before this one was lost on the way
        elif self.next_offset < self.received:
            self._from(self.received)  # the service holds more than we sent this time: skip it


class BackgroundUploads:
    """Uploads arguments for an Executor off the caller's thread and its I/O thread, ``threads`` at a time.

    Daemon threads: a script leaving by Ctrl-C is not held until its uploads end (their tasks were never
    submitted, so nothing runs).
    """

    def __init__(self, settings: ServiceSettings, resend_after: float, answer_timeout: float,
                 threads: int = 2) -> None:
        self.settings = settings
        self.resend_after = resend_after
        self.answer_timeout = answer_timeout
        self._slots = threading.BoundedSemaphore(threads)

    def start(self, data: bytes, uploaded: Callable[[LargeArgs], None],
              failed: Callable[[BaseException], None]) -> None:
        def run() -> None:
            try:
                with self._slots:
                    large, _ = upload(self.settings, data, self.resend_after, self.answer_timeout)
            except Exception as exc:  # noqa: BLE001 - whatever it is, the future must learn of it
                failed(exc)
                return
            uploaded(large)

        threading.Thread(target=run, name="mep-upload", daemon=True).start()
