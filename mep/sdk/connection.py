"""How the SDK reaches the service: settings from arguments or environment, CURVE sockets, requests.

Every SDK socket uses a fresh CURVE key pair and the service key the user
pinned. A pinned key that does not match the service's is reported within a
second as an ``AuthenticationError`` instead of ZeroMQ's silent retrying; a
service that is down, restarting or dying mid-handshake is only retried
(``HandshakeWatch`` says how the two are told apart).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from mep.errors import AuthenticationError, ConfigurationError, ServiceUnreachableError, error_for_code
from mep.protocol import decode, encode
from mep.protocol.curve import check_public_key, generate_keypair, make_curve_client
from mep.protocol.framing import MAX_HEADER_BYTES
from mep.protocol.messages import Error

# What a CURVE client sees on its monitor socket, measured here (libzmq 4.3.5, pyzmq 27.3) against a live
# service, a stopped one, a real service killed right after it binds, and fake peers that accept and die:
# - wrong pinned key, service up: every attempt is CONNECTED, then HANDSHAKE_FAILED_NO_DETAIL with errno
#   EPIPE (the service cannot open our HELLO and closes without a ZMTP ERROR), then a reconnect 100 ms later,
#   forever; never CLOSED, never HANDSHAKE_SUCCEEDED;
# - nothing listening (down, restarting): CONNECT_DELAYED, CLOSED, CONNECT_RETRIED, no handshake event;
# - a service killed while our connection waited in its backlog or mid-handshake: HANDSHAKE_FAILED_NO_DETAIL
#   with errno ECONNRESET (the kernel resets it), or EPIPE when it died after reading all we sent; the
#   next attempts are refused (CLOSED) or succeed once it is back;
# - a peer that is not a CURVE server: HANDSHAKE_FAILED_PROTOCOL (mechanism mismatch), and no retry.
# So no event or errno alone is specific to a wrong key (the issue-10 bug was reading NO_DETAIL as one).
# A mismatch is concluded from what only a live service refusing our key keeps doing: the handshake ending
# in an orderly close on several consecutive connections over a while, with nothing refused and nothing
# succeeding between them.
WATCHED_EVENTS = (zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
MISMATCH_ATTEMPTS = 5
MISMATCH_SECONDS = 1.0

log = logging.getLogger(__name__)


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

    def connect(self, context: zmq.Context) -> tuple[zmq.Socket, HandshakeWatch]:
        """A connected DEALER and the watch over its handshakes."""
        socket = context.socket(zmq.DEALER)
        socket.linger = 0
        socket.reconnect_ivl = 100
        socket.reconnect_ivl_max = 5000  # back off to 5 s while the service is down
        socket.maxmsgsize = 4 * MAX_HEADER_BYTES  # per frame, as every mep receiver (docs/protocol.md §15)
        make_curve_client(socket, self.public_key, generate_keypair()[1])
        watch = HandshakeWatch(self, socket.get_monitor_socket(WATCHED_EVENTS))
        socket.connect(self.address)
        return socket, watch

    def no_answer_message(self, seconds: float) -> str:
        return f"no answer from the service at {self.address} within {seconds:.0f} s (is it running and reachable?)"


class HandshakeWatch:
    """Reads a socket's monitor events and decides when the handshakes failing mean a wrong pinned key.

    Poll ``monitor`` with the socket; when it is readable call ``check``, which raises the error that
    retrying cannot cure (a key mismatch, a peer that is not a mep service) and otherwise returns, so the
    connection keeps being retried.
    """

    def __init__(self, settings: ServiceSettings, monitor: zmq.Socket) -> None:
        self.settings = settings
        self.monitor = monitor
        self._orderly_failures = 0
        self._first_failure_at = 0.0

    def check(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                log.info("the encrypted handshake with the service at %s failed (%s); retrying",
                         self.settings.address, os.strerror(value))
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value == errno.EPIPE:
                if self._orderly_failures == 0:
                    self._first_failure_at = time.monotonic()
                self._orderly_failures += 1
                if (self._orderly_failures >= MISMATCH_ATTEMPTS
                        and time.monotonic() - self._first_failure_at >= MISMATCH_SECONDS):
                    raise self.settings.handshake_error()
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                raise AuthenticationError(
                    f"could not open an encrypted session with {self.settings.address}: the peer there does not "
                    f"speak mep's CURVE protocol (ZMTP error {value:#x}); is it the mep service's address?")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise AuthenticationError(f"the service at {self.settings.address} refused this connection "
                                          f"(status {value})")
            else:  # refused, reset (the service died) or succeeded: whatever failed before was no key mismatch
                self._orderly_failures = 0

    def close(self, socket: zmq.Socket) -> None:
        socket.disable_monitor()
        self.monitor.close(linger=0)


def request(settings: ServiceSettings, header: msgspec.Struct, timeout: float,
            preceded_by: Sequence[msgspec.Struct] = ()) -> tuple[Any, list[bytes]]:
    """Send one request and wait for its reply; service errors are raised as their exception types.

    ``preceded_by`` are messages the service does not answer; the service
    handles a connection's messages in order, so the reply proves they arrived.
    """
    context = zmq.Context.instance()
    socket, watch = settings.connect(context)
    try:
        for message in (*preceded_by, header):
            socket.send_multipart(encode(message))
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(watch.monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while not socket.poll(0):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceUnreachableError(settings.no_answer_message(timeout))
            # short slices: Ctrl-C is handled between them even where a long poll would not be interrupted
            poller.poll(min(remaining, 0.2) * 1000)
            watch.check()
        reply, payloads = decode(socket.recv_multipart())
    finally:
        watch.close(socket)
        socket.close(linger=0)
    if isinstance(reply, Error):
        raise error_for_code(reply.code, reply.message)
    return reply, payloads


def _missing(argument: str, variable: str) -> str:
    raise ConfigurationError(f"pass {argument}=... or set the {variable} environment variable")
