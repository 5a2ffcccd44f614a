"""The endpoint-worker wire of local workers: length-prefixed pickles of the bootstrap's plain tuples on a stream
socket, with ``recv``/``send``/``poll``/``fileno`` like ``multiprocessing.connection.Connection``."""

from __future__ import annotations

import pickle
import select
import socket
import struct

_LENGTH = struct.Struct("!Q")
_SMALL = 65536  # below this a frame is one write (header joined to the data), and read through the buffer


class Channel:
    """Length-prefixed pickles over a stream socket.

    Reads are buffered: one ``recv`` system call takes in every small message
    already sent (a worker's replies, a batch of tasks), and ``poll`` says
    whether one is waiting without a system call when one is buffered.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, value: object) -> None:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        header = _LENGTH.pack(len(data))
        if len(data) < _SMALL:
            self._sock.sendall(header + data)
        else:
            self._sock.sendall(header)
            self._sock.sendall(data)

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether ``recv`` has something (a message, or the end) to return without waiting past ``timeout``."""
        return bool(self._buffer) or bool(select.select([self._sock], [], [], timeout)[0])

    def recv(self) -> object:
        while len(self._buffer) < _LENGTH.size:
            self._fill()
        (length,) = _LENGTH.unpack_from(self._buffer)
        end = _LENGTH.size + length
        if end <= len(self._buffer) or length < _SMALL:
            while len(self._buffer) < end:
                self._fill()
            value = pickle.loads(memoryview(self._buffer)[_LENGTH.size:end])
            del self._buffer[:end]
            return value
        # A large frame is read into a buffer of its own size: never grown, never copied again.
        data = bytearray(length)
        view = memoryview(data)
        got = len(self._buffer) - _LENGTH.size
        view[:got] = memoryview(self._buffer)[_LENGTH.size:]
        self._buffer.clear()
        while got < length:
            count = self._sock.recv_into(view[got:])
            if not count:
                raise EOFError("the other end closed the channel")
            got += count
        return pickle.loads(data)

    def _fill(self) -> None:
        chunk = self._sock.recv(_SMALL)
        if not chunk:
            raise EOFError("the other end closed the channel")
        self._buffer += chunk

    def close(self) -> None:
        self._sock.close()
