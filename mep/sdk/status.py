"""Ask the service how it and an endpoint's manager processes are doing (``mep status``)."""

from __future__ import annotations

from typing import Any

import msgspec

from mep.errors import MepError
from mep.protocol.messages import StatusReply, StatusRequest
from mep.sdk.connection import ServiceSettings, request


def fetch_status(service: str, service_key: str, token: str, endpoint_id: str = "",
                 timeout: float = 10.0) -> dict[str, Any]:
    settings = ServiceSettings.resolve(service, service_key, token)
    reply, _ = request(settings, StatusRequest(token=settings.token, request_id=1, endpoint_id=endpoint_id), timeout)
    if not isinstance(reply, StatusReply):
        raise MepError(f"unexpected {type(reply).__name__} from the service")
    return {"endpoint_online": reply.endpoint_online,
            "processes": [msgspec.to_builtins(process) for process in reply.processes]}
