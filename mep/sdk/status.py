"""Ask the service how it and an endpoint's manager processes are doing (``mep status``)."""

from __future__ import annotations

from typing import Any

import msgspec
import zmq

from mep.errors import MepError, error_for_code
from mep.protocol import decode, encode
from mep.protocol.curve import check_public_key, generate_keypair, make_curve_client
from mep.protocol.messages import Error, StatusReply, StatusRequest


def fetch_status(service: str, service_key: str, token: str, endpoint_id: str = "",
                 timeout: float = 10.0) -> dict[str, Any]:
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.linger = 0
    try:
        _, secret = generate_keypair()
        make_curve_client(socket, check_public_key(service_key, "the service key"), secret)
        socket.connect(service)
        socket.send_multipart(encode(StatusRequest(token=token, request_id=1, endpoint_id=endpoint_id)))
        if not socket.poll(timeout * 1000):
            raise MepError(f"no answer from the service at {service} within {timeout:.0f} s "
                           "(is it running, and is the service key right?)")
        header, _ = decode(socket.recv_multipart())
    finally:
        socket.close()
    if isinstance(header, Error):
        raise error_for_code(header.code, header.message)
    if not isinstance(header, StatusReply):
        raise MepError(f"unexpected {type(header).__name__} from the service")
    return {"endpoint_online": header.endpoint_online,
            "processes": [msgspec.to_builtins(process) for process in header.processes]}
