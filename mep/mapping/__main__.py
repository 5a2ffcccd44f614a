"""The identity-mapping helper: a ``HelperLoad`` on stdin, then requests answered on fd 3.

Started by root (``mep.root.identity``) as ``identity_mapping_user`` when a
mapping file is loaded; it loads the content root read and checked, answers
once whether it loaded, then maps one identity set per request on the channel
(a ``SOCK_SEQPACKET`` socket at fd 3: one message per request, a JSON list of
identities, and one per answer, a ``HelperReply`` that fits ``MAX_REPLY_BYTES``)
until root closes it. Every error becomes a refusal in the reply, so root never
has to guess; what the engine logs (a program's stderr) travels in the reply for
root's log.
"""

from __future__ import annotations

import ctypes

# First of all: no process of the same account may attach to this one (ptrace, /proc/<pid>/mem) and forge its answer.
if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
    raise SystemExit(f"mep.mapping: PR_SET_DUMPABLE failed (errno {ctypes.get_errno()})")

import logging  # noqa: E402 - after the prctl
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import msgspec  # noqa: E402

from mep.mapping.engine import MappingRules  # noqa: E402
from mep.root.errors import ConfigurationError, MappingError, UnmappedIdentityError  # noqa: E402
from mep.root.identity import MAX_LOG_LINES, MAX_REPLY_BYTES, HelperReply, MappingContext  # noqa: E402

CHANNEL_FD = 3  # a SOCK_SEQPACKET socket, root's other end: requests in, answers out
MAX_REQUEST_BYTES = 1 << 20
MAX_MESSAGE_CHARACTERS = 4000  # a refusal's message and detail, when its answer would not fit otherwise
_KINDS = ((UnmappedIdentityError, "unmapped"), (MappingError, "mapping"), (ConfigurationError, "configuration"))


class HelperLoad(msgspec.Struct, forbid_unknown_fields=True):
    """Root to helper, once, on its stdin: the file's content and what evaluating it needs."""

    content: bytes
    source: str
    context: MappingContext


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
            return HelperReply(refusal=kind, message=error.message, admin_detail=error.admin_detail)
    # A bug or a bad request: root fails closed on "internal"
    return HelperReply(refusal="internal", message=type(error).__name__, admin_detail=str(error))


def _fitted(reply: HelperReply) -> bytes:
    """The reply as one message of at most ``MAX_REPLY_BYTES``: log lines left out and messages cut if need be."""
    data = msgspec.json.encode(reply)
    if len(data) > MAX_REPLY_BYTES:
        reply.log = [(logging.WARNING, f"{len(reply.log)} log lines left out: the answer must fit {MAX_REPLY_BYTES}"
                                       " bytes")]
        reply.message = reply.message[:MAX_MESSAGE_CHARACTERS]
        reply.admin_detail = reply.admin_detail[:MAX_MESSAGE_CHARACTERS]
        data = msgspec.json.encode(reply)
    return data


def main() -> None:
    collector = _Collector()
    logging.getLogger().addHandler(collector)
    logging.getLogger().setLevel(logging.INFO)
    channel = socket.socket(fileno=CHANNEL_FD)

    def send(reply: HelperReply) -> None:
        reply.log, collector.lines = collector.lines, []
        channel.send(_fitted(reply))

    try:
        load = msgspec.json.decode(sys.stdin.buffer.read(), type=HelperLoad)
        rules = MappingRules.from_content(load.content, source=load.source, context=load.context)
    except Exception as error:  # noqa: BLE001 - every failure is the load's answer
        send(_refused(error))
        return
    send(HelperReply())
    while request := channel.recv(MAX_REQUEST_BYTES):  # b"": root closed the channel
        try:
            send(HelperReply(decision=rules.map(msgspec.json.decode(request, type=list[dict[str, Any]]))))
        except Exception as error:  # noqa: BLE001 - one request's failure is its answer
            send(_refused(error))


if __name__ == "__main__":
    main()
