"""The private channel between router and spawner: one envelope per SOCK_SEQPACKET datagram.

Created with ``socketpair`` before the manager splits, so no other process can
reach it. Only envelopes travel here (``SpawnRequest`` and its answers), never
a task frame.
"""

from __future__ import annotations

import socket

import msgspec

from mep.errors import ProtocolError
from mep.protocol.messages import Header

MAX_DATAGRAM = 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(router end, spawner end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class SpawnerLink:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: msgspec.Struct) -> None:
        data = _encoder.encode(message)
        if len(data) > MAX_DATAGRAM:
            raise ProtocolError(f"{type(message).__name__} of {len(data)} bytes exceeds {MAX_DATAGRAM}")
        self.sock.sendall(data)

    def receive(self) -> msgspec.Struct | None:
        """The next envelope, or None when the other side has closed the channel."""
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except ConnectionResetError:
            return None
        if not data:
            return None
        try:
            return _decoder.decode(data)
        except msgspec.MsgspecError as exc:
            raise ProtocolError(f"invalid message on the spawner channel: {exc}") from None
