"""The identity-mapping helper: a ``HelperLoad`` on stdin, then ``HelperRequest`` frames answered on fd 3.

Started by root (``mep.root.identity``) as ``identity_mapping_user`` when a
mapping file is loaded; it loads the content root read and checked, answers
once whether it loaded, then maps one identity set per frame on the channel
(a socket at fd 3: 4-byte big-endian length, msgspec JSON) until root closes
it. Every error becomes a refusal in the reply, so root never has to guess;
what the engine logs (a program's stderr) travels in the reply for root's log.
"""

from __future__ import annotations

import ctypes

# First of all: no process of the same account may attach to this one (ptrace, /proc/<pid>/mem) and forge its answer.
if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
    raise SystemExit(f"mep.mapping: PR_SET_DUMPABLE failed (errno {ctypes.get_errno()})")

import dataclasses  # noqa: E402 - after the prctl
import logging  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import msgspec  # noqa: E402

from mep.mapping.engine import MappingRules  # noqa: E402
from mep.root.errors import ConfigurationError, MappingError, UnmappedIdentityError  # noqa: E402
from mep.root.identity import (  # noqa: E402
    FRAME_HEADER_BYTES,
    MAX_LOG_LINES,
    HelperDecision,
    HelperLoad,
    HelperRefusal,
    HelperReply,
    HelperRequest,
    MappingContext,
    encode_frame,
)

CHANNEL_FD = 3  # a socket, root's other end: requests in, answers out
MAX_REQUEST_BYTES = 1 << 20
_KINDS = ((UnmappedIdentityError, "unmapped"), (MappingError, "mapping"), (ConfigurationError, "configuration"))


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < MAX_LOG_LINES:
            self.lines.append((record.levelno, record.getMessage()[:8000]))


def _refused(error: Exception) -> HelperReply:
    for cls, kind in _KINDS:
        if isinstance(error, cls):
            return HelperReply(refusal=HelperRefusal(kind, error.message[:60000], error.admin_detail[:60000]))
    # A bug or a bad request: root fails closed on "internal"
    return HelperReply(refusal=HelperRefusal("internal", type(error).__name__, str(error)[:8000]))


def _receive_frame(channel: socket.socket) -> bytes | None:
    """The next request frame; None when root closed the channel."""
    header = channel.recv(FRAME_HEADER_BYTES, socket.MSG_WAITALL)
    if len(header) < FRAME_HEADER_BYTES:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_REQUEST_BYTES:
        raise SystemExit(f"mep.mapping: a request of {size} bytes, more than {MAX_REQUEST_BYTES}")
    body = channel.recv(size, socket.MSG_WAITALL)
    return body if len(body) == size else None


def main() -> None:
    collector = _Collector()
    logging.getLogger().addHandler(collector)
    logging.getLogger().setLevel(logging.INFO)
    channel = socket.socket(fileno=CHANNEL_FD)

    def send(reply: HelperReply) -> None:
        reply.log, collector.lines = collector.lines, []
        channel.sendall(encode_frame(msgspec.json.encode(reply)))

    try:
        load = msgspec.json.decode(sys.stdin.buffer.read(), type=HelperLoad)
        context = MappingContext(load.endpoint_id, load.external_timeout, frozenset(load.trusted_owner_uids))
        rules = MappingRules.from_content(load.content, source=load.source, context=context)
    except Exception as error:  # noqa: BLE001 - every failure is the load's answer
        send(_refused(error))
        return
    send(HelperReply())
    while (frame := _receive_frame(channel)) is not None:
        try:
            decision = rules.map(msgspec.json.decode(frame, type=HelperRequest).identities)
            send(HelperReply(decision=HelperDecision(**dataclasses.asdict(decision))))
        except Exception as error:  # noqa: BLE001 - one request's failure is its answer
            send(_refused(error))


if __name__ == "__main__":
    main()
