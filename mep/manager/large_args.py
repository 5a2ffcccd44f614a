"""The router's part in a task's uploaded arguments: pass the endpoint's chunk requests to the service.

A user endpoint may ask only for the arguments of a task this router sent
it and that it still holds (the service checks again that the task is this
endpoint's and unfinished, and reads the submitter's own upload). Each
request is renamed with an id of this router's, remembered until its answer
comes, and the answer goes back to the endpoint that asked, the one chunk
passing through being all that is held here.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mep.errors import ErrorCode
from mep.protocol.messages import Chunk, ChunkRequest

log = logging.getLogger(__name__)

MAX_PENDING_REQUESTS = 10_000  # requests whose answers never came (the service restarted) are forgotten, oldest first


class ArgumentRelay:
    def __init__(self, send_endpoint: Callable[[Any, Chunk, list[Any]], bool],
                 send_service: Callable[[ChunkRequest], None]) -> None:
        self._send_endpoint = send_endpoint
        self._send_service = send_service
        self._ids = itertools.count(1)
        self._pending: OrderedDict[int, tuple[str, int]] = OrderedDict()  # our id -> (endpoint id, its request id)

    def forward(self, link: Any, request: ChunkRequest, task_endpoint: dict[str, str]) -> None:
        """``link``: the endpoint asking; ``task_endpoint``: where each task in flight was sent."""
        if task_endpoint.get(request.task_id) != link.endpoint_id or request.task_id not in link.in_flight:
            log.warning("endpoint %s (%s) asked for the arguments of task %s, which it does not hold; refused",
                        link.endpoint_id, link.account, request.task_id)
            self._send_endpoint(link, Chunk(request_id=request.request_id, offset=request.offset,
                                            code=ErrorCode.LARGE_ARGS_UNAVAILABLE,
                                            message=f"task {request.task_id} is not in flight on this endpoint"), [])
            return
        relay_id = next(self._ids)
        self._pending[relay_id] = (link.endpoint_id, request.request_id)
        while len(self._pending) > MAX_PENDING_REQUESTS:
            self._pending.popitem(last=False)
        self._send_service(ChunkRequest(request_id=relay_id, task_id=request.task_id, offset=request.offset,
                                        length=request.length))

    def answered(self, chunk: Chunk, payloads: list[Any], endpoints: dict[str, Any]) -> None:
        asked = self._pending.pop(chunk.request_id, None)
        link = endpoints.get(asked[0]) if asked else None
        if link is None or link.routing_id is None:
            log.info("the service answered argument request %d, which no endpoint here waits for; dropped",
                     chunk.request_id)
            return
        self._send_endpoint(link, Chunk(request_id=asked[1], offset=chunk.offset, code=chunk.code,
                                        message=chunk.message), payloads[:1])
