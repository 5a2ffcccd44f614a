"""How the SDK reaches the service: settings from arguments or environment, CURVE sockets, requests.

Every SDK socket uses a fresh CURVE key pair and the service key the user
pinned; a handshake failure (the pinned key is wrong) is reported at once as
an ``AuthenticationError`` instead of ZeroMQ's silent retrying.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from mep.errors import AuthenticationError, ConfigurationError, MepError, error_for_code
from mep.protocol import decode, encode
from mep.protocol.curve import check_public_key, generate_keypair, make_curve_client
from mep.protocol.framing import MAX_HEADER_BYTES
from mep.protocol.messages import Error

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True)
class ServiceSettings:
    """Where the service is, which key it must prove it holds, and who we are to it."""

    address: str
    public_key: str
    token: str

    @classmethod
    def resolve(cls, service: str | None, service_key: str | None, token: str | None) -> ServiceSettings:
        """Arguments first, then MEP_SERVICE, MEP_SERVICE_KEY and MEP_TOKEN."""
        address = service or os.environ.get("MEP_SERVICE") or _missing("service", "MEP_SERVICE")
        key = service_key or os.environ.get("MEP_SERVICE_KEY") or _missing("service_key", "MEP_SERVICE_KEY")
        return cls(address=address, public_key=check_public_key(key, "service_key"),
                   token=token or os.environ.get("MEP_TOKEN") or _missing("token", "MEP_TOKEN"))

    def handshake_error(self) -> AuthenticationError:
        return AuthenticationError(
            f"could not open an encrypted session with the service at {self.address}: the service key pinned "
            "here does not match the service's (check service_key / MEP_SERVICE_KEY against 'mep service key')")

    def connect(self, context: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
        """A connected DEALER and a monitor socket that reports failed handshakes."""
        socket = context.socket(zmq.DEALER)
        socket.linger = 0
        socket.reconnect_ivl = 100
        socket.reconnect_ivl_max = 5000  # back off to 5 s while the service is down
        socket.maxmsgsize = 4 * MAX_HEADER_BYTES  # per frame, as every mep receiver (docs/protocol.md §15)
        make_curve_client(socket, self.public_key, generate_keypair()[1])
        monitor = socket.get_monitor_socket(HANDSHAKE_FAILED)
        socket.connect(self.address)
        return socket, monitor


def request(settings: ServiceSettings, header: msgspec.Struct, timeout: float,
            preceded_by: Sequence[msgspec.Struct] = ()) -> tuple[Any, list[bytes]]:
    """Send one request and wait for its reply; service errors are raised as their exception types.

    ``preceded_by`` are messages the service does not answer; the service
    handles a connection's messages in order, so the reply proves they arrived.
    """
    context = zmq.Context.instance()
    socket, monitor = settings.connect(context)
    try:
        for message in (*preceded_by, header):
            socket.send_multipart(encode(message))
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        ready = dict(poller.poll(timeout * 1000))
        if monitor in ready:
            raise settings.handshake_error()
        if socket not in ready:
            raise MepError(f"no answer from the service at {settings.address} within {timeout:.0f} s "
                           "(is it running and reachable?)")
        reply, payloads = decode(socket.recv_multipart())
    finally:
        socket.disable_monitor()
        monitor.close(linger=0)
        socket.close(linger=0)
    if isinstance(reply, Error):
        raise error_for_code(reply.code, reply.message)
    return reply, payloads


def _missing(argument: str, variable: str) -> str:
    raise ConfigurationError(f"pass {argument}=... or set the {variable} environment variable")
