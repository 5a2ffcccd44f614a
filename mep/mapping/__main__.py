"""The identity-mapping helper: one ``HelperRequest`` on stdin, one ``HelperReply`` on fd 3, then exit.

Started by root (``mep.root.identity``) as ``identity_mapping_user``; it
loads the mapping content root read and checked, and maps the identity set
when there is one. Every error becomes a refusal in the reply, so root never
has to guess; what the engine logs (a program's stderr) travels in the reply
for root's log.
"""

from __future__ import annotations

import ctypes

# First of all: no process of the same account may attach to this one (ptrace, /proc/<pid>/mem) and forge its answer.
if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
    raise SystemExit(f"mep.mapping: PR_SET_DUMPABLE failed (errno {ctypes.get_errno()})")

import dataclasses  # noqa: E402 - after the prctl
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import msgspec  # noqa: E402

from mep.mapping.engine import MappingRules  # noqa: E402
from mep.root.errors import ConfigurationError, MappingError, UnmappedIdentityError  # noqa: E402
from mep.root.identity import (  # noqa: E402
    MAX_LOG_LINES,
    HelperDecision,
    HelperRefusal,
    HelperReply,
    HelperRequest,
    MappingContext,
)

REPLY_FD = 3  # privdrop.run_for_answer's answer pipe
_KINDS = ((UnmappedIdentityError, "unmapped"), (MappingError, "mapping"), (ConfigurationError, "configuration"))


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < MAX_LOG_LINES:
            self.lines.append((record.levelno, record.getMessage()[:8000]))


def answer(request: HelperRequest) -> HelperReply:
    context = MappingContext(request.endpoint_id, request.external_timeout, frozenset(request.trusted_owner_uids))
    try:
        rules = MappingRules.from_content(request.content, source=request.source, context=context)
        if request.identities is None:
            return HelperReply()
        decision = rules.map(request.identities)
    except (UnmappedIdentityError, MappingError, ConfigurationError) as error:
        kind = next(kind for cls, kind in _KINDS if isinstance(error, cls))
        return HelperReply(refusal=HelperRefusal(kind, error.message[:60000], error.admin_detail[:60000]))
    return HelperReply(decision=HelperDecision(**dataclasses.asdict(decision)))


def main() -> None:
    collector = _Collector()
    logging.getLogger().addHandler(collector)
    logging.getLogger().setLevel(logging.INFO)
    try:
        reply = answer(msgspec.json.decode(sys.stdin.buffer.read(), type=HelperRequest))
    except Exception as error:  # noqa: BLE001 - a bug or a bad request: root fails closed on "internal"
        reply = HelperReply(refusal=HelperRefusal("internal", type(error).__name__, str(error)[:8000]))
    reply.log = collector.lines
    data = msgspec.json.encode(reply)
    while data:
        data = data[os.write(REPLY_FD, data):]


if __name__ == "__main__":
    main()
