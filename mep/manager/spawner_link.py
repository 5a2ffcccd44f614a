"""The private channel between router and spawner: one envelope per SOCK_SEQPACKET datagram.

Created with ``socketpair`` before the manager splits, so no other process can
reach it. Only envelopes travel here (``SpawnRequest`` and its answers), never
a task frame.

Both ends are non-blocking with an outbox: if each side blocked writing while
the other's buffer was full of its own writes, both would wait forever. A
loop calls ``flush`` when the socket is writable (``wants_write``).
"""

from __future__ import annotations

import collections
import socket
from typing import Literal

import msgspec

from mep.errors import ProtocolError
from mep.protocol.framing import decode_header

MAX_DATAGRAM = 1024 * 1024

# The router's descriptors, as the spawner passes them to the fresh router process (0-2 are /dev/null).
CHANNEL_FD = 3  # its end of this channel
LOCK_FD = 4  # the instance lock, held as long as any part of the manager runs
LOG_FD = 5  # a pipe the spawner relays to its own log


class RouterBoot(msgspec.Struct, forbid_unknown_fields=True):
    """What the spawner writes to a new router's stdin (secrets travel there, never in argv or the environment)."""

    config: dict  # the ManagerConfig, as JSON
    manager_secret_key: str  # for the service link
    endpoint_address: str  # ipc:// address of the endpoint socket
    endpoint_secret_key: str  # the router's endpoint-facing key, kept across restarts
    log_level: int
    log_format: Literal["text", "json"] = "text"
    # The admin's schema and template as the root side read them (policy-checked), for ENDPOINT_INFO: the
    # router's account can't read /etc/mep/NAME (0700, it holds manager.key). Parsed only by the router.
    schema_text: str = ""
    template_text: str = ""

_encoder = msgspec.msgpack.Encoder()


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(router end, spawner end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class SpawnerLink:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._outbox: collections.deque[bytes] = collections.deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self._outbox)

    def send(self, message: msgspec.Struct) -> None:
        data = _encoder.encode(message)
        if len(data) > MAX_DATAGRAM:
            raise ProtocolError(f"{type(message).__name__} of {len(data)} bytes exceeds {MAX_DATAGRAM}")
        self._outbox.append(data)
        self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; the rest waits for the next ``flush``."""
        while self._outbox:
            try:
                self.sock.send(self._outbox[0])
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError):
                self._outbox.clear()  # the other side is gone; receive() reports it
                return
            self._outbox.popleft()

    def receive(self) -> msgspec.Struct | None:
        """The next envelope, or None when the other side has closed the channel.

        Raises ``BlockingIOError`` when nothing is waiting (call it when the socket is readable).
        """
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except ConnectionResetError:
            return None
        if not data:
            return None
        return decode_header(data, "message on the spawner channel")
