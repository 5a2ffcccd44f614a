"""The router's part in fetching a large result: pass each chunk read to an endpoint of the file's account.

The file belongs to the account whose endpoint wrote it, so any running
endpoint of that account can read it (the one that wrote it first). Each
read is remembered until its answer comes, so an endpoint can answer only
reads it was given (never another account's). Nothing is buffered here but
the one chunk passing through.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from mep.errors import ErrorCode
from mep.protocol.messages import Chunk, ChunkRead

MAX_PENDING_READS = 10_000  # reads whose answers never came (their endpoint died) are forgotten, oldest first


class _Endpoint(Protocol):
    endpoint_id: str
    account: str
    retired: bool
    routing_id: bytes | None


class ChunkRelay:
    def __init__(self, send_endpoint: Callable[[Any, ChunkRead], bool],
                 send_service: Callable[[Chunk, list[Any]], None]) -> None:
        self._send_endpoint = send_endpoint
        self._send_service = send_service
        self._pending: OrderedDict[int, str] = OrderedDict()  # fetch id -> endpoint id asked

    def forward(self, read: ChunkRead, endpoints: dict[str, Any]) -> None:
        link = self._reader(read, endpoints.values(), endpoints.get(read.large.endpoint_id if read.large else ""))
        if link is None or not self._send_endpoint(link, read):
            account = read.large.account if read.large else "?"
            self._send_service(Chunk(fetch_id=read.fetch_id, offset=read.offset,
                                     code=ErrorCode.LARGE_RESULT_NO_READER,
                                     message=f"no endpoint of account {account} is running on this manager to read "
                                             "the result file; any task sent to the endpoint starts one (an "
                                             "Executor does so and fetches again), or read the file where it is: "
                                             f"{read.large.path if read.large else ''}"), [])
            return
        self._pending[read.fetch_id] = link.endpoint_id
        while len(self._pending) > MAX_PENDING_READS:
            self._pending.popitem(last=False)

    @staticmethod
    def _reader(read: ChunkRead, links: Iterable[_Endpoint], writer: _Endpoint | None) -> _Endpoint | None:
        if read.large is None:
            return None
        candidates = [writer] if writer is not None else []
        candidates += [link for link in links if link.account == read.large.account]
        return next((link for link in candidates if not link.retired and link.routing_id is not None), None)

    def answered(self, endpoint_id: str, chunk: Chunk, payloads: list[Any]) -> bool:
        """Pass an endpoint's answer on; False (dropped) when that endpoint was not asked this read."""
        if self._pending.get(chunk.fetch_id) != endpoint_id:
            return False
        del self._pending[chunk.fetch_id]
        self._send_service(chunk, payloads[:1])
        return True
