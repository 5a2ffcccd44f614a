"""Chunks of large results, relayed between a client and the endpoint host that keeps the file.

A result above the endpoint's threshold stays in a file on the endpoint's
host; the service stores only its reference (``tasks.result_large``). A
client that can't read the file in place asks for it a chunk at a time
(``CHUNK_REQUEST``): only the identity that submitted the task gets an
answer, as for inline results. The service asks the task's manager
(``CHUNK_READ``), whose router asks a user endpoint of the account, and
passes the answer (``CHUNK``) back. Nothing is stored or buffered here but the
chunk passing through, and the bytes are never looked at; the client's
window of outstanding requests bounds what is in flight.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from typing import Any, Protocol

from mep.errors import LargeResultUnavailableError
from mep.protocol.messages import Chunk, ChunkRead, ChunkRequest
from mep.service.store import Store

log = logging.getLogger(__name__)

MAX_PENDING_FETCHES = 10_000  # reads never answered (the manager went away) are forgotten, oldest first


class _Outbox(Protocol):
    def reply(self, routing_id: bytes, header: Any, payloads: list[Any] | None = None) -> None: ...


class ChunkFetches:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._ids = itertools.count(1)
        self._pending: OrderedDict[int, tuple[str, bytes, int]] = OrderedDict()  # fetch id -> who asked, where

    def request(self, identity_id: str, routing_id: bytes, request: ChunkRequest, managers: dict[str, Any],
                outbox: _Outbox) -> None:
        found = self.store.large_result(identity_id, request.task_id)
        if found is None:
            raise LargeResultUnavailableError(
                f"task {request.task_id} has no large result of yours to fetch (not your task, not finished, "
                "already collected, or expired)")
        endpoint_id, large = found
        link = managers.get(endpoint_id)
        if link is None:
            raise LargeResultUnavailableError(
                f"the manager of endpoint {endpoint_id}, whose host keeps the result file {large.path}, is not "
                "connected to the service; fetch it again once the endpoint is online")
        fetch_id = next(self._ids)
        self._pending[fetch_id] = (endpoint_id, routing_id, request.request_id)
        while len(self._pending) > MAX_PENDING_FETCHES:
            self._pending.popitem(last=False)
        outbox.reply(link.routing_id, ChunkRead(fetch_id=fetch_id, large=large, offset=request.offset,
                                                length=request.length))

    def answered(self, endpoint_id: str, chunk: Chunk, payloads: list[Any], outbox: _Outbox) -> None:
        asked = self._pending.get(chunk.fetch_id)
        if asked is None or asked[0] != endpoint_id:
            log.info("endpoint %s sent a chunk for read %d, which it was not asked (or was forgotten); dropped",
                     endpoint_id, chunk.fetch_id)
            return
        del self._pending[chunk.fetch_id]
        _, routing_id, request_id = asked
        outbox.reply(routing_id, Chunk(request_id=request_id, offset=chunk.offset, code=chunk.code,
                                       message=chunk.message), payloads[:1])
